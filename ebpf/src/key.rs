//! Socket keys: the 4-tuple layout shared with `bpf/shoal.bpf.c`, and the gateway's view of a
//! descriptor connection.
//!
//! A [`SockKey`] is a socket's 4-tuple as the *sending* socket sees it, 12 bytes in network
//! byte order: source address, destination address, source port, destination port — the bytes
//! as they are on the wire, so building one does not depend on this machine's endianness. The
//! peer socket's key is the swapped tuple ([`SockKey::peer`]). The programs key both the
//! SOCKHASH and the connection → function map with it.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use crate::{Error, Result};

/// A socket's 4-tuple as it sends: `{sip, dip, sport, dport}`, all big-endian (`struct
/// shoal_sock_key` in `bpf/shoal.bpf.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey([u8; 12]);

impl SockKey {
    /// The key of a socket bound to `local` and connected to `remote`.
    pub fn new(local: SocketAddrV4, remote: SocketAddrV4) -> SockKey {
        let mut bytes = [0u8; 12];
        bytes[0..4].copy_from_slice(&local.ip().octets());
        bytes[4..8].copy_from_slice(&remote.ip().octets());
        bytes[8..10].copy_from_slice(&local.port().to_be_bytes());
        bytes[10..12].copy_from_slice(&remote.port().to_be_bytes());
        SockKey(bytes)
    }

    /// The key as the map stores it.
    pub fn from_bytes(bytes: [u8; 12]) -> SockKey {
        SockKey(bytes)
    }

    /// The bytes the map stores.
    pub fn to_bytes(self) -> [u8; 12] {
        self.0
    }

    /// The sending socket's address.
    pub fn local(&self) -> SocketAddrV4 {
        let [a, b, c, d, _, _, _, _, p0, p1, _, _] = self.0;
        SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([p0, p1]))
    }

    /// The receiving socket's address.
    pub fn remote(&self) -> SocketAddrV4 {
        let [_, _, _, _, a, b, c, d, _, _, p0, p1] = self.0;
        SocketAddrV4::new(Ipv4Addr::new(a, b, c, d), u16::from_be_bytes([p0, p1]))
    }

    /// The key of the socket at the other end (the tuple swapped): what `shoal_sk_msg` looks up
    /// to redirect.
    pub fn peer(&self) -> SockKey {
        SockKey::new(self.remote(), self.local())
    }
}

impl fmt::Display for SockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{}", self.local(), self.remote())
    }
}

/// A descriptor connection between the gateway and a function host, as the gateway sees it on
/// the accepted socket: `gateway` is its local address (a descriptor port), `host` the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionTuple {
    /// The gateway's end: the address its descriptor listener accepted on.
    pub gateway: SocketAddrV4,
    /// The function host's end.
    pub host: SocketAddrV4,
}

impl ConnectionTuple {
    /// From the gateway's accepted socket: `local_addr()` and `peer_addr()`.
    ///
    /// # Errors
    /// [`Error::NotIpv4`] for an IPv6 address, IPv4-mapped ones included: such a socket is
    /// `AF_INET6` to the kernel and the programs leave it alone.
    pub fn from_gateway_socket(local: SocketAddr, peer: SocketAddr) -> Result<ConnectionTuple> {
        Ok(ConnectionTuple { gateway: v4(local)?, host: v4(peer)? })
    }

    /// From the function host's connected socket: `local_addr()` and `peer_addr()`.
    ///
    /// # Errors
    /// As [`ConnectionTuple::from_gateway_socket`].
    pub fn from_host_socket(local: SocketAddr, peer: SocketAddr) -> Result<ConnectionTuple> {
        Ok(ConnectionTuple { gateway: v4(peer)?, host: v4(local)? })
    }

    /// Key of the gateway's socket: the sender of descriptors (gateway → host).
    pub fn gateway_key(&self) -> SockKey {
        SockKey::new(self.gateway, self.host)
    }

    /// Key of the function host's socket: the sender of release replies (host → gateway).
    pub fn host_key(&self) -> SockKey {
        SockKey::new(self.host, self.gateway)
    }
}

impl fmt::Display for ConnectionTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gateway {} <-> host {}", self.gateway, self.host)
    }
}

fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(v4) => Ok(v4),
        SocketAddr::V6(_) => Err(Error::NotIpv4(addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn key_bytes_are_the_wire_bytes() {
        let key = SockKey::new(addr("127.0.0.1:4222"), addr("10.1.2.3:50000"));
        // 4222 = 0x107e, 50000 = 0xc350
        assert_eq!(key.to_bytes(), [127, 0, 0, 1, 10, 1, 2, 3, 0x10, 0x7e, 0xc3, 0x50]);
        assert_eq!(SockKey::from_bytes(key.to_bytes()), key);
        assert_eq!(key.local(), addr("127.0.0.1:4222"));
        assert_eq!(key.remote(), addr("10.1.2.3:50000"));
        assert_eq!(key.to_string(), "127.0.0.1:4222->10.1.2.3:50000");
    }

    #[test]
    fn peer_swaps_the_tuple_and_is_an_involution() {
        let key = SockKey::new(addr("127.0.0.1:7000"), addr("127.0.0.2:40001"));
        let peer = key.peer();
        assert_eq!(peer.to_bytes(), [127, 0, 0, 2, 127, 0, 0, 1, 0x9c, 0x41, 0x1b, 0x58]);
        assert_eq!(peer.peer(), key);
        assert_ne!(peer, key);
    }

    #[test]
    fn keys_differ_when_only_the_remote_port_differs() {
        // Never by local port alone: two hosts on one gateway port are two keys.
        let a = SockKey::new(addr("127.0.0.1:7000"), addr("127.0.0.1:40001"));
        let b = SockKey::new(addr("127.0.0.1:7000"), addr("127.0.0.1:40002"));
        assert_ne!(a, b);
    }

    #[test]
    fn tuple_from_either_end_gives_the_same_keys() {
        let gateway: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let host: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let seen_by_gateway = ConnectionTuple::from_gateway_socket(gateway, host).unwrap();
        let seen_by_host = ConnectionTuple::from_host_socket(host, gateway).unwrap();
        assert_eq!(seen_by_gateway, seen_by_host);
        assert_eq!(seen_by_gateway.gateway_key().peer(), seen_by_gateway.host_key());
        assert_eq!(seen_by_gateway.gateway_key().local(), addr("127.0.0.1:7000"));
    }

    #[test]
    fn ipv6_is_refused_mapped_or_not() {
        let v4: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        for v6 in ["[::1]:7000", "[::ffff:127.0.0.1]:7000"] {
            let v6: SocketAddr = v6.parse().unwrap();
            let err = ConnectionTuple::from_gateway_socket(v6, v4).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Unsupported);
            assert!(ConnectionTuple::from_host_socket(v4, v6).is_err());
        }
    }
}
