//! Generates the gRPC code into OUT_DIR, plus a file descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_descriptor.bin"))
        .compile_protos(&["tessera/v1/inference.proto", "tessera/worker/v1/worker.proto"], &["."])?;
    Ok(())
}
