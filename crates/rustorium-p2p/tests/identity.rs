//! Keys, key files, PeerId and PeerAddr text forms.

use std::path::Path;

use rustorium_p2p::{KeyError, Keypair, ParseError, PeerAddr, PeerId};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn key_file_round_trip_with_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let key = Keypair::generate();
    key.save(&path).unwrap();
    let loaded = Keypair::load(&path).unwrap();
    assert_eq!(loaded.peer_id(), key.peer_id());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{text}");
}

#[test]
fn an_existing_key_file_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.key");
    let first = Keypair::generate();
    first.save(&path).unwrap();
    let err = Keypair::generate().save(&path).unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(Keypair::load(&path).unwrap().peer_id(), first.peer_id());
}

#[test]
fn an_openssl_ed25519_key_loads_with_the_right_peer_id() {
    // Written by `openssl genpkey -algorithm ed25519`; the PeerId by
    // `openssl pkey -pubout -outform DER | tail -c 32`.
    let key = Keypair::load(&fixture("openssl-ed25519.pem")).unwrap();
    let expected = std::fs::read_to_string(fixture("openssl-ed25519.peerid")).unwrap();
    assert_eq!(key.peer_id().to_string(), expected.trim());
}

#[test]
fn an_openssl_key_made_now_loads_too() {
    // The same, live, where openssl is installed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.pem");
    let status = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .status();
    match status {
        Ok(s) if s.success() => {
            Keypair::load(&path).unwrap();
        }
        _ => eprintln!("openssl not installed: covered by the fixture test"),
    }
}

#[test]
fn wrong_key_types_and_corrupt_files_give_clear_errors() {
    let cases = [
        (fixture("openssl-p256-pkcs8.pem"), "Ed25519"),
        (fixture("openssl-p256-sec1.pem"), "elliptic-curve"),
        (fixture("does-not-exist.pem"), "cannot read"),
    ];
    for (path, expect) in cases {
        let err = Keypair::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::File { .. } | KeyError::Read { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(expect), "{}: {text}", path.display());
        assert!(
            text.contains(&path.display().to_string()),
            "names the file: {text}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let corrupt: [&[u8]; 4] = [
        b"",
        b"not a key at all",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        &[0xff, 0xfe, 0x00, 0x01],
    ];
    for (i, bytes) in corrupt.iter().enumerate() {
        let path = dir.path().join(format!("corrupt{i}"));
        std::fs::write(&path, bytes).unwrap();
        let err = Keypair::load(&path).unwrap_err();
        assert!(
            matches!(err, KeyError::File { .. } | KeyError::NotText { .. }),
            "case {i}: {err:?}"
        );
    }
}

#[test]
fn peer_id_text_form() {
    let key = Keypair::generate();
    let id = key.peer_id();
    let text = id.to_string();
    assert_eq!(text.len(), 64);
    assert!(text
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    assert_eq!(text.parse::<PeerId>().unwrap(), id);
    assert_eq!(text.to_uppercase().parse::<PeerId>().unwrap(), id);
    assert_eq!(
        id.as_bytes(),
        &PeerId::from_bytes(*id.as_bytes()).as_bytes().clone()
    );
}

#[test]
fn bad_peer_ids_say_what_is_wrong() {
    let good = "ab".repeat(32);
    assert_eq!("".parse::<PeerId>(), Err(ParseError::PeerIdLength(0)));
    assert_eq!(
        good[..63].parse::<PeerId>(),
        Err(ParseError::PeerIdLength(63))
    );
    assert_eq!(
        format!("{good}0").parse::<PeerId>(),
        Err(ParseError::PeerIdLength(65))
    );
    let with_g = format!("{}g{}", &good[..10], &good[11..]);
    assert_eq!(
        with_g.parse::<PeerId>(),
        Err(ParseError::PeerIdCharacter {
            found: 'g',
            position: 10
        })
    );
    // A multi-byte character: 64 characters but not 64 bytes.
    let with_e = format!("é{}", &good[1..]);
    assert_eq!(
        with_e.parse::<PeerId>(),
        Err(ParseError::PeerIdCharacter {
            found: 'é',
            position: 0
        })
    );
    let msg = ParseError::PeerIdLength(3).to_string();
    assert!(msg.contains("64") && msg.contains('3'), "{msg}");
}

#[test]
fn peer_addr_round_trips_ipv4_and_ipv6() {
    let id = Keypair::generate().peer_id();
    for text in [format!("{id}@127.0.0.1:4433"), format!("{id}@[::1]:4433")] {
        let addr: PeerAddr = text.parse().unwrap();
        assert_eq!(addr.peer_id, id);
        assert_eq!(addr.addr.port(), 4433);
        assert_eq!(addr.to_string(), text);
    }
    let named: PeerAddr = format!("{id}@localhost:9").parse().unwrap();
    assert!(named.addr.ip().is_loopback());
}

#[test]
fn bad_peer_addrs_say_what_is_wrong() {
    let id = "cd".repeat(32);
    let cases = [
        ("127.0.0.1:4433".to_string(), "no '@'"),
        (format!("{id}@127.0.0.1"), "port"),
        (format!("{id}@[::1]"), "port"),
        (format!("{id}@127.0.0.1:99999"), "bad socket address"),
        (format!("{}@127.0.0.1:1", &id[..10]), "64 hex"),
    ];
    for (text, expect) in cases {
        let err = text.parse::<PeerAddr>().unwrap_err().to_string();
        assert!(err.contains(expect), "{text:?} -> {err}");
    }
}

#[test]
fn signatures_verify_only_for_their_key_and_message() {
    let key = Keypair::generate();
    let sig = key.sign(b"message");
    assert!(key.peer_id().verify(b"message", &sig));
    assert!(!key.peer_id().verify(b"massage", &sig));
    assert!(!Keypair::generate().peer_id().verify(b"message", &sig));
}
