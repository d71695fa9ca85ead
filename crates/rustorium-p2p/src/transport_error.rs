//! The one place where quinn's and rustls's errors are read: which of our errors a
//! connection close becomes, and the words that describe it.

use std::net::SocketAddr;

use quinn::{ConnectionError, ReadError, TransportErrorCode};
use rustls::AlertDescription;

use crate::error::{ConnectError, Refusal, RequestError, TlsAlert};
use crate::identity::PeerId;
use crate::wire::code;

/// The TLS alert carried by a QUIC CRYPTO_ERROR close (codes 0x100 to 0x1ff).
pub(crate) fn tls_alert(err: &ConnectionError) -> Option<TlsAlert> {
    let ConnectionError::ConnectionClosed(close) = err else {
        return None;
    };
    let alert = crypto_alert(close.error_code)?;
    Some(TlsAlert {
        description: AlertDescription::from(alert),
        message: String::from_utf8_lossy(&close.reason).into_owned(),
    })
}

fn crypto_alert(code: TransportErrorCode) -> Option<u8> {
    let code = u64::from(code);
    // `checked_sub`, not `then_some(code - 0x100)`: that would be evaluated for any code.
    code.checked_sub(0x100)
        .filter(|alert| *alert <= 0xff)
        .map(|alert| alert as u8)
}

/// Whether this node refused a handshake because its allow or deny list does not admit
/// the peer (TLS alert 49, access denied, raised by our own verifier).
pub(crate) fn we_denied_access(err: &ConnectionError) -> bool {
    let denied = TransportErrorCode::crypto(u8::from(AlertDescription::AccessDenied));
    matches!(err, ConnectionError::TransportError(e) if e.code == denied)
}

/// Whether the peer closed the connection as the loser of a simultaneous dial.
pub(crate) fn is_duplicate_close(err: &ConnectionError) -> bool {
    matches!(err, ConnectionError::ApplicationClosed(close)
        if close.error_code.into_inner() == u64::from(code::CLOSE_DUPLICATE))
}

/// The error for a connection that closed before (or while) its handshake completed.
pub(crate) fn connect_error(peer: PeerId, addr: SocketAddr, err: ConnectionError) -> ConnectError {
    if let Some(alert) = tls_alert(&err) {
        if alert.description == AlertDescription::AccessDenied {
            let reason = Refusal::DeniedByPeer;
            return ConnectError::Refused { peer, reason };
        }
        if alert.is_about_certificate() {
            return ConnectError::CertificateRejected { peer, addr, alert };
        }
    }
    match refusal(&err) {
        Some(reason) => ConnectError::Refused { peer, reason },
        None => ConnectError::Handshake {
            peer,
            addr,
            source: Box::new(err),
        },
    }
}

/// Whether a close means the peer refused us.
pub(crate) fn refusal(err: &ConnectionError) -> Option<Refusal> {
    match err {
        ConnectionError::ApplicationClosed(close)
            if close.error_code.into_inner() == u64::from(code::CLOSE_REFUSED) =>
        {
            Some(Refusal::ByPeer(
                String::from_utf8_lossy(&close.reason).into_owned(),
            ))
        }
        ConnectionError::ConnectionClosed(close)
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED =>
        {
            Some(Refusal::PeerAtLimit)
        }
        _ => None,
    }
}

/// What closed a connection, in words.
pub(crate) fn describe_close(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ApplicationClosed(close) => {
            let why = String::from_utf8_lossy(&close.reason);
            match close.error_code.into_inner() {
                c if c == u64::from(code::CLOSE_SHUTDOWN) => format!("the peer shut down ({why})"),
                c if c == u64::from(code::CLOSE_DUPLICATE) => {
                    format!("the peer closed a duplicate connection ({why})")
                }
                c if c == u64::from(code::CLOSE_REFUSED) => format!("the peer refused us: {why}"),
                other => format!("the peer closed the connection with code {other} ({why})"),
            }
        }
        ConnectionError::ConnectionClosed(close) => match tls_alert(err) {
            Some(alert) => format!("the peer ended the TLS session: {alert}"),
            None if close.error_code == TransportErrorCode::CONNECTION_REFUSED => {
                Refusal::PeerAtLimit.to_string()
            }
            None => format!("the peer closed the connection: {close}"),
        },
        ConnectionError::TimedOut => {
            "no answer from the peer within the idle timeout (peer down or unreachable)".into()
        }
        ConnectionError::LocallyClosed => {
            "this node closed the connection (shutdown, disconnect, or a 0-RTT handshake that did not complete in time)".into()
        }
        ConnectionError::Reset => "the peer reset the connection (it may have restarted)".into(),
        other => other.to_string(),
    }
}

/// A stream read failure, in words.
pub(crate) fn describe_read(err: &ReadError) -> String {
    match err {
        ReadError::ConnectionLost(e) => describe_close(e),
        ReadError::Reset(c) => format!(
            "the peer reset the stream with code {c} ({})",
            code::describe(c.into_inner())
        ),
        other => other.to_string(),
    }
}

/// The error for a request whose connection closed under it: a refusal or a refused
/// certificate says so, anything else is a lost connection.
pub(crate) fn request_error(peer: PeerId, addr: SocketAddr, err: ConnectionError) -> RequestError {
    match connect_error(peer, addr, err) {
        ConnectError::Handshake { source, .. } => RequestError::ConnectionLost { peer, source },
        other => RequestError::Connect(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_alerts_are_read_from_crypto_error_codes_only() {
        use quinn::TransportErrorCode as Code;
        assert_eq!(crypto_alert(Code::crypto(45)), Some(45));
        assert_eq!(crypto_alert(Code::crypto(0)), Some(0));
        assert_eq!(crypto_alert(Code::crypto(0xff)), Some(0xff));
        // Transport codes below the CRYPTO_ERROR range (the overflow this guards against).
        for other in [
            Code::NO_ERROR,
            Code::INTERNAL_ERROR,
            Code::CONNECTION_REFUSED,
            Code::PROTOCOL_VIOLATION,
            Code::AEAD_LIMIT_REACHED,
        ] {
            assert_eq!(crypto_alert(other), None, "code {other:?}");
        }
    }

    #[test]
    fn tls_alerts_are_named_by_rustls() {
        let alert = TlsAlert {
            description: AlertDescription::from(45),
            message: "invalid peer certificate: Expired".into(),
        };
        assert_eq!(
            alert.to_string(),
            "TLS alert 45 (CertificateExpired): invalid peer certificate: Expired"
        );
        let alpn = TlsAlert {
            description: AlertDescription::from(120),
            message: String::new(),
        };
        assert_eq!(alpn.to_string(), "TLS alert 120 (NoApplicationProtocol)");
        assert!(alert.is_about_certificate());
        let required = TlsAlert {
            description: AlertDescription::CertificateRequired,
            message: String::new(),
        };
        assert!(required.is_about_certificate());
        assert!(!alpn.is_about_certificate());
    }
}
