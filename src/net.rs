//! Sockets every server of this crate opens the same way.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds a TCP listener on `addr` and reads back the address it got (the port the system chose
/// when `addr` asked for port 0).
pub async fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn port_zero_reads_back_the_port_chosen() {
        let (listener, bound) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_ne!(bound.port(), 0);
        assert_eq!(listener.local_addr().unwrap(), bound);
    }

    #[tokio::test]
    async fn a_taken_address_is_an_error() {
        let (_listener, bound) = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert!(bind(bound).await.is_err());
    }
}
