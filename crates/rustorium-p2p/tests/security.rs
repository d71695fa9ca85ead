//! Authentication: pinned PeerIds, mandatory client certificates, Ed25519 only, ALPN.
//! Each refused peer must not disturb the node's service to well-behaved peers.

mod common;

use common::{
    raw_client, raw_connection, raw_request, refused_raw_client, test_node, tls_alert_of,
    ClientCert, WAIT,
};
use rustorium_p2p::certificate::CertError;
use rustorium_p2p::{ConnectError, Keypair, Node, PeerAddr};

/// A node with test routes, plus a well-behaved client already connected to it.
async fn server_and_good_client() -> (Node, Node) {
    let (server, _) = test_node();
    let server = server.bind().await.unwrap();
    let good = Node::builder().bind().await.unwrap();
    good.connect(&server.peer_addr()).await.unwrap();
    (server, good)
}

async fn assert_still_serving(server: &Node, good: &Node) {
    let answer = good.request(server.peer_id(), "echo", "still here").await;
    assert_eq!(answer.unwrap(), "still here");
}

#[tokio::test]
async fn dialing_the_wrong_peer_id_fails_naming_both_keys() {
    let (server, good) = server_and_good_client().await;
    let client = Node::builder().bind().await.unwrap();
    let expected = Keypair::generate().peer_id();
    let wrong = PeerAddr::new(expected, server.local_addr());
    let err = client.connect(&wrong).await.unwrap_err();
    match &err {
        ConnectError::PeerIdMismatch {
            expected: e,
            actual,
            addr,
        } => {
            assert_eq!(*e, expected);
            assert_eq!(*actual, server.peer_id());
            assert_eq!(*addr, server.local_addr());
        }
        other => panic!("expected PeerIdMismatch, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains(&expected.to_string()), "{text}");
    assert!(text.contains(&server.peer_id().to_string()), "{text}");
    assert_eq!(client.connection_count(), 0);
    assert_still_serving(&server, &good).await;
}

/// Tries a raw connection and a request on it; returns whether any answer came back.
async fn raw_attempt(server: &Node, cert: ClientCert, alpn: &[u8]) -> Result<Vec<u8>, String> {
    let (endpoint, config) = raw_client(cert, alpn);
    let connecting = endpoint
        .connect_with(config, server.local_addr(), "rustorium")
        .unwrap();
    let conn = tokio::time::timeout(WAIT, connecting)
        .await
        .expect("handshake hung")
        .map_err(|e| e.to_string())?;
    // TLS 1.3: the client may believe the handshake is done before the server has checked
    // its certificate; the refusal then arrives as a connection close.
    let attempt = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        send.write_all(b"\x04echohello")
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        recv.read_to_end(1024).await.map_err(|e| e.to_string())
    };
    let result = tokio::time::timeout(WAIT, attempt)
        .await
        .expect("request hung");
    result.map_err(|e| format!("{e}: {:?}", conn.close_reason()))
}

#[tokio::test]
async fn a_client_without_certificate_is_refused() {
    let (server, good) = server_and_good_client().await;
    let err = raw_attempt(&server, ClientCert::None, b"rustorium")
        .await
        .unwrap_err();
    assert!(
        err.contains("certificate") || err.contains("116"),
        "refusal names the missing certificate: {err}"
    );
    assert_eq!(server.connection_count(), 1, "only the good client");
    assert_still_serving(&server, &good).await;
}

#[tokio::test]
async fn a_client_with_a_non_ed25519_certificate_is_refused() {
    let (server, good) = server_and_good_client().await;
    // The node's CertificateRequest offers only Ed25519, so an honest rustls client with an
    // ECDSA key sends no certificate at all: the client here forces its ECDSA certificate
    // and signature through anyway, as a hostile one would.
    let err = refused_raw_client(server.local_addr(), ClientCert::ForcedEcdsaP256).await;
    assert_eq!(tls_alert_of(&err), Some(46), "certificate_unknown: {err}");
    assert!(
        err.to_string().contains("Ed25519"),
        "names what is wrong: {err}"
    );
    assert_eq!(server.connection_count(), 1, "only the good client");
    assert_still_serving(&server, &good).await;
}

#[tokio::test]
async fn a_client_with_a_chain_of_two_certificates_is_refused() {
    let (server, good) = server_and_good_client().await;
    let err = refused_raw_client(server.local_addr(), ClientCert::Chain).await;
    assert_eq!(tls_alert_of(&err), Some(46), "certificate_unknown: {err}");
    assert!(
        err.to_string().contains("exactly one"),
        "names what is wrong: {err}"
    );
    assert_eq!(server.connection_count(), 1, "only the good client");
    assert_still_serving(&server, &good).await;
}

#[tokio::test]
async fn a_client_with_a_not_yet_valid_certificate_is_refused() {
    let (server, good) = server_and_good_client().await;
    let err = refused_raw_client(server.local_addr(), ClientCert::NotYetValid).await;
    assert_eq!(tls_alert_of(&err), Some(45), "certificate_expired: {err}");
    assert_eq!(server.connection_count(), 1, "only the good client");
    assert_still_serving(&server, &good).await;
}

#[tokio::test]
async fn a_raw_client_with_an_ed25519_certificate_is_accepted() {
    // The control for the two tests above: the same raw client, with a valid certificate.
    let (server, _good) = server_and_good_client().await;
    let answer = raw_attempt(&server, ClientCert::Ed25519, b"rustorium")
        .await
        .unwrap();
    assert_eq!(answer, b"\x00hello");
}

#[tokio::test]
async fn a_wrong_alpn_is_refused() {
    let (server, good) = server_and_good_client().await;
    let err = raw_attempt(&server, ClientCert::Ed25519, b"h3")
        .await
        .unwrap_err();
    assert!(err.contains("120") || err.contains("protocol"), "{err}");

    // Our own library with another ALPN gets a clear error too.
    let other = Node::builder().alpn("other-app").bind().await.unwrap();
    let err = other.connect(&server.peer_addr()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Handshake { .. }), "{err:?}");
    assert!(err.to_string().contains("NoApplicationProtocol"), "{err}");
    assert_still_serving(&server, &good).await;
}

#[tokio::test]
async fn the_handler_sees_the_authenticated_peer_id_of_a_raw_client() {
    let (server, _good) = server_and_good_client().await;
    let (_endpoint, conn) = raw_connection(server.local_addr()).await;
    let answer = raw_request(&conn, b"\x06whoami").await;
    assert_eq!(answer[0], 0);
    let id: rustorium_p2p::PeerId = std::str::from_utf8(&answer[1..]).unwrap().parse().unwrap();
    assert_ne!(id, server.peer_id());
    assert!(server.connected_peers().contains(&id));
}

/// Dials a raw server presenting `cert`, pinning `peer`; the error.
async fn dial_refused(cert: common::ServerCert) -> ConnectError {
    let (server, peer) = common::raw_server(cert);
    let node = Node::builder().bind().await.unwrap();
    let to = PeerAddr::new(peer, server.local_addr().unwrap());
    let dialed = tokio::time::timeout(WAIT, node.connect(&to))
        .await
        .expect("dial hung");
    assert_eq!(node.connection_count(), 0);
    dialed.expect_err("the certificate must be refused")
}

#[tokio::test]
async fn a_server_presenting_a_non_ed25519_certificate_is_refused_by_the_dialer() {
    match dial_refused(common::ServerCert::ForcedEcdsaP256).await {
        ConnectError::InvalidCertificate {
            reason: CertError::NotEd25519,
            ..
        } => {}
        other => panic!("expected InvalidCertificate(NotEd25519), got {other:?}"),
    }
}

#[tokio::test]
async fn a_server_presenting_a_chain_of_two_certificates_is_refused_by_the_dialer() {
    // The first certificate holds the pinned key: only the chain is wrong.
    let err = dial_refused(common::ServerCert::Chain).await;
    assert!(
        matches!(
            err,
            ConnectError::InvalidCertificate {
                reason: CertError::NotSingle(2),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("chain of 2"), "{err}");
}

#[tokio::test]
async fn a_server_presenting_a_not_yet_valid_certificate_is_refused_by_the_dialer() {
    let err = dial_refused(common::ServerCert::NotYetValid).await;
    assert!(
        matches!(
            err,
            ConnectError::InvalidCertificate {
                reason: CertError::NotYetValid,
                ..
            }
        ),
        "{err:?}"
    );
}
