//! `keygen`, `id`, and finding the key a command should use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use rustorium_p2p::Keypair;

pub fn keygen(out: &Path) -> anyhow::Result<ExitCode> {
    let key = Keypair::generate();
    key.save(out)?;
    println!("{}", key.peer_id());
    Ok(ExitCode::SUCCESS)
}

pub fn id(path: &Path) -> anyhow::Result<ExitCode> {
    println!("{}", Keypair::load(path)?.peer_id());
    Ok(ExitCode::SUCCESS)
}

/// The named key, or an ephemeral one for client commands.
pub fn key_or_ephemeral(path: Option<&Path>) -> anyhow::Result<Keypair> {
    Ok(match path {
        Some(path) => Keypair::load(path)?,
        None => Keypair::generate(),
    })
}

/// The node's key: the named file, or `node.key` in the data directory (made on first use).
pub fn node_key(path: Option<&Path>) -> anyhow::Result<(Keypair, PathBuf)> {
    if let Some(path) = path {
        return Ok((Keypair::load(path)?, path.to_path_buf()));
    }
    let dir = data_dir();
    let path = dir.join("node.key");
    if path.exists() {
        return Ok((Keypair::load(&path)?, path));
    }
    create_private_dir(&dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let key = Keypair::generate();
    key.save(&path)?;
    tracing::info!(path = %path.display(), "generated a new node key");
    Ok((key, path))
}

/// `$RUSTORIUM_P2P_DATA_DIR`, else `$XDG_DATA_HOME/rustorium-p2p`, else
/// `~/.local/share/rustorium-p2p`.
fn data_dir() -> PathBuf {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env("RUSTORIUM_P2P_DATA_DIR") {
        return dir;
    }
    if let Some(dir) = env("XDG_DATA_HOME") {
        return dir.join("rustorium-p2p");
    }
    match env("HOME") {
        Some(home) => home.join(".local/share/rustorium-p2p"),
        None => PathBuf::from(".rustorium-p2p"),
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}
