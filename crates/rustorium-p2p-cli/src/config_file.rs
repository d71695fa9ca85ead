//! The `node` command's TOML file: the library's [`Config`] (sections `[node]`, `[limits]`,
//! `[transport]`) and the command's own keys in `[node]` (`metrics_addr`, `log_level`,
//! `log_format`). Errors name the key, with the line and column for syntax and type errors.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rustorium_p2p::config::{Limits, NodeSettings, TransportSettings};
use rustorium_p2p::{Config, PeerAddr, PeerId};
use serde::{Deserialize, Serialize};

/// The default configuration file, every key commented (what `config default` prints).
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// A configuration file: what the node runs with, and how the command logs and serves
/// metrics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    /// `[node]`.
    pub node: NodeSection,
    /// `[limits]`, the library's.
    pub limits: Limits,
    /// `[transport]`, the library's.
    pub transport: TransportSettings,
}

/// The `[node]` section: the library's node settings (see [`NodeSettings`] for each)
/// and the command's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(missing_docs)]
pub struct NodeSection {
    pub key_file: Option<PathBuf>,
    pub listen: SocketAddr,
    pub alpn: String,
    pub peers: Vec<PeerAddr>,
    pub allow: Option<HashSet<PeerId>>,
    pub deny: HashSet<PeerId>,
    pub zero_rtt: bool,
    pub io_thread: bool,
    /// Serve Prometheus metrics over HTTP at `http://<addr>/metrics`; `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Log filter (`RUST_LOG` syntax), overridden by `RUST_LOG`.
    pub log_level: String,
    /// Log format: `pretty` or `json`.
    pub log_format: LogFormat,
}

/// How the `node` command writes its log lines (to stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Default for NodeSection {
    fn default() -> Self {
        let lib = NodeSettings::default();
        NodeSection {
            key_file: lib.key_file,
            listen: lib.listen,
            alpn: lib.alpn,
            peers: lib.peers,
            allow: lib.allow,
            deny: lib.deny,
            zero_rtt: lib.zero_rtt,
            io_thread: lib.io_thread,
            metrics_addr: None,
            log_level: "info".to_string(),
            log_format: LogFormat::Pretty,
        }
    }
}

impl FileConfig {
    /// Reads a configuration from TOML text and validates it.
    pub fn from_toml_str(text: &str) -> Result<FileConfig, String> {
        let file: FileConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
        check_log_level(&file.node.log_level).map_err(|e| format!("node.log_level: {e}"))?;
        file.node_config().validate().map_err(|e| e.problem)?;
        Ok(file)
    }

    /// Reads and validates a configuration file; the error names the file. A relative
    /// `key_file` is taken from the file's folder, not the working directory, so a node
    /// started from anywhere finds the same key.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let mut file =
            Self::from_toml_str(&text).map_err(|msg| format!("{}: {msg}", path.display()))?;
        if let Some(key) = &mut file.node.key_file {
            if key.is_relative() {
                *key = path.parent().unwrap_or(Path::new("")).join(&*key);
            }
        }
        Ok(file)
    }

    /// The library configuration in the file.
    pub fn node_config(&self) -> Config {
        let n = &self.node;
        let mut config = Config::default();
        config.node.key_file = n.key_file.clone();
        config.node.listen = n.listen;
        config.node.alpn = n.alpn.clone();
        config.node.peers = n.peers.clone();
        config.node.allow = n.allow.clone();
        config.node.deny = n.deny.clone();
        config.node.zero_rtt = n.zero_rtt;
        config.node.io_thread = n.io_thread;
        config.limits = self.limits.clone();
        config.transport = self.transport.clone();
        config
    }
}

/// A TOML error as "line L, column C (key): message".
fn toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim_end();
    match err.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            match key_at(text, line) {
                Some(key) => format!("line {line}, column {column} ({key}): {message}"),
                None => format!("line {line}, column {column}: {message}"),
            }
        }
        None => message.to_string(),
    }
}

/// `section.key` of the assignment on `line` (1-based), for error messages.
fn key_at(text: &str, line: usize) -> Option<String> {
    let mut section = String::new();
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('[') {
            section = trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
        }
        if i + 1 == line {
            let key = trimmed.split('=').next()?.trim();
            if key.is_empty() || trimmed.starts_with('[') || !trimmed.contains('=') {
                return None;
            }
            return Some(if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    None
}

/// The levels a `log_level` directive may name.
const LEVELS: [&str; 12] = [
    "off", "error", "warn", "info", "debug", "trace", "0", "1", "2", "3", "4", "5",
];

/// Checks a `log_level` filter (`RUST_LOG` syntax). A bare word must be a level: a filter
/// such as `verbose` is valid `RUST_LOG` syntax (the target `verbose` at every level), and
/// would silently log nothing from this program.
pub fn check_log_level(filter: &str) -> Result<(), String> {
    // Span filters (`[span{field=1,other=2}]=debug`) hold commas: the parser alone reads them.
    let spans = filter.contains('[');
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((_, level)) => level,
            None => directive,
        };
        if !spans && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let within = if level == filter {
                String::new()
            } else {
                format!(" (in {filter:?})")
            };
            return Err(format!(
                "{level:?}{within} is not a level; use one of {} (or target=level, as in \"rustorium_p2p=debug,warn\")",
                LEVELS[..6].join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map(drop)
        .map_err(|e| format!("{filter:?} is not a log filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_file_is_the_default_config() {
        assert_eq!(
            FileConfig::from_toml_str(DEFAULT_TOML).unwrap(),
            FileConfig::default()
        );
        assert_eq!(
            FileConfig::from_toml_str("").unwrap(),
            FileConfig::default()
        );
        assert_eq!(FileConfig::default().node_config(), Config::default());
    }

    #[test]
    fn the_readme_shows_the_current_default_file() {
        assert!(include_str!("../../../README.md").contains(DEFAULT_TOML));
    }

    #[test]
    fn the_default_file_comments_every_key() {
        let mut previous_is_comment = false;
        for line in DEFAULT_TOML.lines() {
            let line = line.trim();
            if line.contains('=') && !line.starts_with('#') {
                assert!(
                    previous_is_comment,
                    "key without a comment above it: {line}"
                );
            }
            previous_is_comment = line.starts_with('#');
        }
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = FileConfig::from_toml_str("[limits]\nrequest_timout = \"1s\"\n").unwrap_err();
        assert!(
            err.contains("line 2") && err.contains("request_timout"),
            "{err}"
        );

        let err = FileConfig::from_toml_str("[transport]\nmax_idle_timeout = 30\n").unwrap_err();
        assert!(err.contains("transport.max_idle_timeout"), "{err}");

        let err =
            FileConfig::from_toml_str("[transport]\nkeep_alive_interval = \"40s\"\n").unwrap_err();
        assert!(err.contains("transport.keep_alive_interval"), "{err}");

        let err = FileConfig::from_toml_str("[transport]\ncongestion_controller = \"vegas\"\n")
            .unwrap_err();
        assert!(err.contains("vegas"), "{err}");

        let err = FileConfig::from_toml_str("[node]\nlog_format = \"xml\"\n").unwrap_err();
        assert!(err.contains("node.log_format"), "{err}");
    }

    #[test]
    fn keep_alive_can_be_off() {
        let file =
            FileConfig::from_toml_str("[transport]\nkeep_alive_interval = \"off\"\n").unwrap();
        assert_eq!(file.transport.keep_alive_interval, None);
    }
}
