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
