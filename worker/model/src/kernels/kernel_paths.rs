//! Kernel paths a test could not run because this CPU lacks their instructions.
//!
//! A SIMD kernel test checks every path the CPU has and cannot check the others; a test that
//! returned early would look green while an AVX-512 kernel went unexercised. So each such test
//! names what it skipped here: printed at once, and appended to the file named by
//! `TESSERA_UNEXERCISED_PATHS` (set by `scripts/test.sh`, which prints the distinct entries as
//! one summary line at the end of the test command).

use std::io::Write;

/// Records that `path` (e.g. `"gemm/q8 avx512vnni"`) was not exercised on this CPU.
pub(crate) fn not_exercised(path: &str) {
    eprintln!("kernel path not exercised on this CPU: {path}");
    let Some(file) = std::env::var_os("TESSERA_UNEXERCISED_PATHS") else { return };
    // One short write per line on an append-mode file: concurrent test threads do not interleave.
    let appended =
        std::fs::OpenOptions::new().create(true).append(true).open(&file).and_then(|mut f| f.write_all(format!("{path}\n").as_bytes()));
    if let Err(e) = appended {
        eprintln!("cannot record the unexercised path in {}: {e}", std::path::Path::new(&file).display());
    }
}
