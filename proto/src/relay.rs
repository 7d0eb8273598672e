//! Relayed sessions of outbound-only workers (DESIGN §7).
//!
//! A worker in `outbound-only` mode accepts no inbound connection. Clients dial the relay
//! port of the controller holding the worker's cluster connection exactly as they would dial
//! the worker: the controller does not take part in their QUIC connection, it only carries
//! its UDP datagrams. For each client address it opens one bidirectional stream on the
//! worker's cluster connection, headed by a [`RelayOpen`] frame ([`crate::frame`]), then
//! carries every datagram both ways as a u16 big-endian length and the datagram's bytes.
//! The worker feeds them to its ordinary session endpoint, so the client's TLS (and the
//! `cnf` check of its key) ends at the worker, and the controller sees only ciphertext.

use serde::{Deserialize, Serialize};

/// The largest datagram a relay stream carries (what its u16 length prefix can say).
pub const MAX_DATAGRAM: usize = u16::MAX as usize;

/// First frame of a relay stream, from the controller.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayOpen {
    /// [`crate::PROTOCOL_VERSION`].
    pub version: u32,
    /// The client's address as the controller sees it (`ip:port`), for the worker's logs.
    pub client: String,
}

/// Why a datagram cannot be carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Longer than [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes exceeds the {MAX_DATAGRAM}-byte relay limit")]
    TooLarge(usize),
    /// Empty: no UDP datagram of QUIC is.
    #[error("empty datagram")]
    Empty,
}

/// The length prefix of a datagram of `len` bytes.
pub fn datagram_header(len: usize) -> Result<[u8; 2], RelayError> {
    match u16::try_from(len) {
        Ok(0) => Err(RelayError::Empty),
        Ok(n) => Ok(n.to_be_bytes()),
        Err(_) => Err(RelayError::TooLarge(len)),
    }
}

/// The datagram length a prefix announces.
pub fn datagram_len(header: [u8; 2]) -> Result<usize, RelayError> {
    match u16::from_be_bytes(header) {
        0 => Err(RelayError::Empty),
        n => Ok(usize::from(n)),
    }
}

/// QUIC stream error codes on relay streams.
pub mod code {
    /// No datagram either way for a while: the client's connection is over.
    pub const IDLE: u32 = 0;
    /// The worker does not take relayed clients (it runs in `direct` mode).
    pub const NOT_RELAYED: u32 = 1;
    /// The stream broke the relay protocol.
    pub const PROTOCOL: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagram_lengths_round_trip_and_are_bounded() {
        let h = datagram_header(1200).expect("fits");
        assert_eq!(datagram_len(h), Ok(1200));
        assert_eq!(datagram_header(0), Err(RelayError::Empty));
        assert_eq!(datagram_header(70_000), Err(RelayError::TooLarge(70_000)));
        assert_eq!(datagram_len([0, 0]), Err(RelayError::Empty));
        assert_eq!(datagram_len([0xff, 0xff]), Ok(MAX_DATAGRAM));
    }
}
