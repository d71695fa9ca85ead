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
/// A key file that others could read or replace is refused, as ssh does.
pub fn node_key(path: Option<&Path>) -> anyhow::Result<(Keypair, PathBuf)> {
    if let Some(path) = path {
        check_private(path)?;
        return Ok((Keypair::load(path)?, path.to_path_buf()));
    }
    let dir = data_dir()?;
    let path = dir.join("node.key");
    if path.exists() {
        check_private(&path)?;
        return Ok((Keypair::load(&path)?, path));
    }
    create_private_dir(&dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    let key = Keypair::generate();
    key.save(&path)?;
    tracing::info!(path = %path.display(), "generated a new node key");
    Ok((key, path))
}

/// Holds a node's key file locked (an advisory `flock`) while the node runs, so a second
/// node cannot start with the same key by accident; unlocked when dropped (or when the
/// process ends, however it ends).
#[derive(Debug)]
pub struct KeyLock(#[allow(dead_code)] std::fs::File);

/// Locks the key file at `path` for this node. `named` says whether the operator named it
/// (`--key`/`key_file`) or it is the data directory's, for the message.
pub fn lock_key(path: &Path, named: bool) -> anyhow::Result<KeyLock> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open key file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(KeyLock(file)),
        Err(std::fs::TryLockError::WouldBlock) => {
            let how = if named {
                "give each node a key of its own"
            } else {
                "this is the data directory's key, used by every node started without --key; give this node its own"
            };
            anyhow::bail!(
                "the key {} is in use by another running node: two nodes with one key would have the same PeerId. {how}: `rustorium-p2p keygen --out other.key`, then `--key other.key`",
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            // Some file systems cannot lock a file opened for reading (NFS, for one): the
            // lock is a guard against a mistake, not a reason not to start.
            tracing::warn!(path = %path.display(), "cannot lock the key file ({e}); another node started on this key would not be stopped");
            Ok(KeyLock(file))
        }
    }
}

/// `$RUSTORIUM_P2P_DATA_DIR`, else `$XDG_DATA_HOME/rustorium-p2p`, else
/// `~/.local/share/rustorium-p2p`. `RUSTORIUM_P2P_DATA_DIR` set but empty is a mistake
/// (a script's unset variable, usually), not a request for the default: refused.
fn data_dir() -> anyhow::Result<PathBuf> {
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if std::env::var_os("RUSTORIUM_P2P_DATA_DIR").is_some_and(|v| v.is_empty()) {
        anyhow::bail!(
            "RUSTORIUM_P2P_DATA_DIR is set but empty: give it a directory, or unset it to use $XDG_DATA_HOME/rustorium-p2p or ~/.local/share/rustorium-p2p"
        );
    }
    if let Some(dir) = env("RUSTORIUM_P2P_DATA_DIR") {
        return Ok(dir);
    }
    if let Some(dir) = env("XDG_DATA_HOME") {
        return Ok(dir.join("rustorium-p2p"));
    }
    Ok(match env("HOME") {
        Some(home) => home.join(".local/share/rustorium-p2p"),
        None => PathBuf::from(".rustorium-p2p"),
    })
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

/// Refuses a key file that the group or others may read or write, or that another user
/// owns: whoever can read it can act as the node, whoever can replace it can choose its
/// identity. (A file that cannot be read at all is left to the key loader to report.)
#[cfg(unix)]
fn check_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "key file {} may be read or written by other users (mode {mode:03o}); \
             make it private with `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    // The uid this process runs as: the owner of its own /proc entry.
    if let Ok(me) = std::fs::metadata("/proc/self") {
        if me.uid() != meta.uid() {
            anyhow::bail!(
                "key file {} belongs to user id {}, not to the user running the node ({}); \
                 use a key of your own, or `chown` it",
                path.display(),
                meta.uid(),
                me.uid()
            );
        }
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> anyhow::Result<()> {
    Ok(())
}
