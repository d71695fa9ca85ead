//! Property tests: encode/decode round trips and decoders that never panic.

use proptest::prelude::*;
use rustorium_p2p::config::{format_duration, format_size, parse_duration, parse_size};
use rustorium_p2p::wire::{check_route, decode_header, decode_status, encode_header, HeaderError};
use rustorium_p2p::{PeerAddr, PeerId};

/// Routes of 1 to 255 bytes of UTF-8.
fn route() -> impl Strategy<Value = String> {
    "\\PC{1,100}".prop_filter("1 to 255 bytes", |r| check_route(r).is_ok())
}

proptest! {
    #[test]
    fn headers_round_trip(route in route(), body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = encode_header(&route);
        bytes.extend_from_slice(&body);
        let (decoded, len) = decode_header(&bytes).unwrap().unwrap();
        prop_assert_eq!(decoded, route.as_str());
        prop_assert_eq!(&bytes[len..], &body[..]);
        // Every strict prefix of the header asks for more bytes.
        for cut in 0..len {
            prop_assert_eq!(decode_header(&bytes[..cut]), Ok(None));
        }
    }

    #[test]
    fn any_bytes_decode_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        match decode_header(&bytes) {
            Ok(Some((route, len))) => {
                prop_assert_eq!(len, 1 + usize::from(bytes[0]));
                prop_assert_eq!(route.as_bytes(), &bytes[1..len]);
            }
            Ok(None) => prop_assert!(bytes.is_empty() || bytes.len() < 1 + usize::from(bytes[0])),
            Err(HeaderError::EmptyRoute) => prop_assert_eq!(bytes[0], 0),
            Err(HeaderError::BadUtf8) => {
                let end = 1 + usize::from(bytes[0]);
                prop_assert!(std::str::from_utf8(&bytes[1..end]).is_err());
            }
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
        let _ = decode_status(&bytes);
    }

    #[test]
    fn peer_ids_and_addrs_round_trip(key in any::<[u8; 32]>(), port in 1u16.., v6 in any::<bool>()) {
        let id = PeerId::from_bytes(key);
        prop_assert_eq!(id.to_string().parse::<PeerId>().unwrap(), id);
        let ip: std::net::IpAddr = if v6 { "::1".parse().unwrap() } else { "127.0.0.1".parse().unwrap() };
        let addr = PeerAddr::new(id, std::net::SocketAddr::new(ip, port));
        prop_assert_eq!(addr.to_string().parse::<PeerAddr>().unwrap(), addr);
    }

    #[test]
    fn any_text_parses_as_a_peer_id_or_fails_cleanly(text in "\\PC{0,80}") {
        let _ = text.parse::<PeerId>();
        let _ = text.parse::<PeerAddr>();
    }

    #[test]
    fn durations_and_sizes_round_trip(ms in 0u64..10_000_000, bytes in any::<u64>()) {
        let d = std::time::Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        prop_assert_eq!(parse_size(&format_size(bytes)), Ok(bytes));
    }

    #[test]
    fn any_config_text_is_accepted_or_refused_cleanly(text in "\\PC{0,200}") {
        let _ = toml::from_str::<rustorium_p2p::Config>(&text).map(|c| c.validate());
    }
}

/// Every `section.key` of the configuration with its default, read from the defaults
/// themselves, so a new key is covered without touching this test.
fn config_keys() -> Vec<(String, String, toml::Value)> {
    let defaults = toml::Value::try_from(rustorium_p2p::Config::default()).unwrap();
    let mut keys = Vec::new();
    for (section, table) in defaults.as_table().unwrap() {
        for (key, value) in table.as_table().unwrap() {
            keys.push((section.clone(), key.clone(), value.clone()));
        }
    }
    // Keys whose default is absent are not serialized; name them here.
    keys.push(("node".into(), "key_file".into(), "k.pem".into()));
    keys.push((
        "node".into(),
        "allow".into(),
        toml::Value::Array(Vec::new()),
    ));
    keys
}

/// Values of the kind the key's default has, from the edges of each range (zero, one, the
/// largest of each width, negative), or, one time in four, of any other kind.
fn value_like(default: &toml::Value) -> BoxedStrategy<String> {
    let units = |u: &'static [&'static str]| prop::sample::select(u.to_vec());
    let edge = prop::sample::select(vec![
        0i128,
        1,
        2,
        255,
        256,
        65_535,
        65_536,
        1 << 31,
        u32::MAX as i128,
        1 << 32,
        i64::MAX as i128,
        -1,
    ]);
    let number = prop_oneof![edge.clone().prop_map(|n| n as u64 as i128), 0i128..200_000];
    let like: BoxedStrategy<String> = match default {
        toml::Value::Integer(_) => prop_oneof![
            edge.prop_map(|n| n.to_string()),
            (0u64..200_000).prop_map(|n| n.to_string()),
        ]
        .boxed(),
        toml::Value::String(text) if parse_duration(text).is_ok() => (
            number.clone(),
            units(&["ms", "s", "m", "h", "us", "ns", "d", ""]),
        )
            .prop_map(|(n, u)| format!("\"{n}{u}\""))
            .boxed(),
        toml::Value::String(text) if parse_size(text).is_ok() => (
            number,
            units(&["B", "KiB", "MiB", "GiB", "TiB", "KB", "MB", ""]),
        )
            .prop_map(|(n, u)| format!("\"{n}{u}\""))
            .boxed(),
        toml::Value::Array(_) => prop_oneof![
            Just("[]".to_string()),
            Just("[\"x\"]".to_string()),
            Just("[\"127.0.0.1:4433\"]".to_string()),
        ]
        .boxed(),
        _ => "[a-zA-Z0-9 .:_/\\[\\]-]{0,24}"
            .prop_map(|s| format!("\"{s}\""))
            .boxed(),
    };
    let other = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[a-zA-Z0-9 .:_/-]{0,24}".prop_map(|s| format!("\"{s}\"")),
        Just("1.5".to_string()),
        Just("[]".to_string()),
    ];
    prop_oneof![3 => like, 1 => other].boxed()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// One key set to any value: refused by the parser (an error at its line: a wrong type
    /// or form), or refused by `validate` with an error that names that key (a value out of
    /// range), or accepted, in which case it survives a write and re-read unchanged.
    #[test]
    fn any_value_for_any_key_is_refused_naming_it_or_round_trips(
        (section, name, value) in prop::sample::select(config_keys())
            .prop_flat_map(|(section, name, default)| {
                (Just(section), Just(name), value_like(&default))
            }),
    ) {
        let text = format!("[{section}]\n{name} = {value}\n");
        match toml::from_str::<rustorium_p2p::Config>(&text) {
            Err(e) => {
                // The parser points at the line and column of the value.
                let message = e.to_string();
                prop_assert!(message.contains("line 2"), "{text}: {message}");
            }
            Ok(config) => match config.validate() {
                Err(e) => {
                    let full = format!("{section}.{name}");
                    // A rule between two keys names both, and the one it blames.
                    let between = e.problem.contains(&full) && e.problem.contains(e.key);
                    prop_assert!(
                        e.key == full || between,
                        "{text}: the error names {} ({e}), not {full}", e.key
                    );
                }
                Ok(()) => {
                    let written = toml::to_string(&config).unwrap();
                    let again: rustorium_p2p::Config = toml::from_str(&written)
                        .unwrap_or_else(|e| panic!("{text}: written as\n{written}\nnot read back: {e}"));
                    prop_assert_eq!(again, config, "{}", text);
                }
            },
        }
    }
}
