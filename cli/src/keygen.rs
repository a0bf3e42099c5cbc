//! `tessera keygen NAME`: a new random API key, and the line of the `--api-keys` file that
//! accepts it (its SHA-256, never the key itself).

use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct KeygenArgs {
    /// The key's name: what logs and metrics call it (letters, digits, - _ . @).
    name: String,
    /// Limits to append to the file line, e.g. max_concurrent=4 tokens_per_minute=10000.
    limits: Vec<String>,
}

/// Random bytes in a key: 256 bits.
const KEY_BYTES: usize = 32;

pub fn run(args: KeygenArgs) -> anyhow::Result<()> {
    let mut bytes = [0u8; KEY_BYTES];
    tessera_tls::provider().secure_random.fill(&mut bytes).map_err(|_| anyhow::anyhow!("no secure random source"))?;
    let key = format!("tsk-{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let line = std::iter::once(args.name.clone())
        .chain([tessera_coordinator::auth::digest_hex(&key)])
        .chain(args.limits.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    // The file line must parse as the coordinator will read it.
    tessera_coordinator::auth::ApiKeys::parse(&line)?;
    println!("{key}");
    println!("{line}");
    eprintln!("the first line is the key (give it to its holder; it is shown only now), the second goes in the --api-keys file");
    Ok(())
}
