//! Mutual TLS at rendezvous: both ends of every connection prove, with a certificate the cluster
//! CA signed, that they belong to the cluster, and exchange their rank hellos inside TLS.
//!
//! A peer without such a certificate fails the handshake and is dropped before anything else is
//! read from it. After the hellos the connection leaves rustls: both ends export keys from the
//! session, and the data path seals its own records with them (`records`), which lets its two
//! directions be used by different threads and its reads spin and block as before.
//!
//! Leaving TLS cleanly needs two things. Records are read one whole record at a time (header,
//! then exactly its length), so rustls never buffers bytes past the last record, which could be
//! the first plain bytes a fast peer sends. And the server sends no session tickets (see
//! `tessera_tls::ServerTls::mutual`), so the last record each side sends is its hello.

use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ProtocolVersion, ServerConfig, ServerConnection};

use super::records::SessionKeys;

/// The configurations of one rank: as the accepting end (lower ranks) and as the connecting end.
/// Both must trust the cluster CA and require the peer's certificate.
#[derive(Debug, Clone)]
pub struct CollectiveTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
}

/// Largest TLS record: 2^14 bytes of plaintext plus the most expansion TLS 1.2 allows.
const MAX_RECORD: usize = (1 << 14) + 2048;
const RECORD_HEADER: usize = 5;

/// A handshaken connection, for the hellos only.
pub(super) struct Secured<'a> {
    stream: &'a TcpStream,
    conn: Connection,
}

impl<'a> Secured<'a> {
    /// TLS as the connecting end, verifying the peer's certificate for its IP address.
    pub fn connect(stream: &'a TcpStream, tls: &CollectiveTls, peer: IpAddr) -> io::Result<Self> {
        let conn = ClientConnection::new(tls.client.clone(), ServerName::IpAddress(peer.into())).map_err(io::Error::other)?;
        Self::handshake(stream, conn.into())
    }

    /// TLS as the accepting end, requiring the peer's certificate.
    pub fn accept(stream: &'a TcpStream, tls: &CollectiveTls) -> io::Result<Self> {
        let conn = ServerConnection::new(tls.server.clone()).map_err(io::Error::other)?;
        Self::handshake(stream, conn.into())
    }

    fn handshake(stream: &'a TcpStream, conn: Connection) -> io::Result<Self> {
        let mut secured = Secured { stream, conn };
        while secured.conn.is_handshaking() {
            if secured.conn.wants_write() {
                secured.flush()?;
            } else {
                secured.read_record()?;
            }
        }
        secured.flush()?;
        Ok(secured)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.conn.writer().write_all(bytes)?;
        self.flush()
    }

    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match self.conn.reader().read(buf) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed TLS during the hello")),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.read_record()?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The keys for the records that follow the hellos. Only TLS 1.3 is accepted, whose
    /// exporter is bound to the whole handshake; both ends are Tessera, which offers it first.
    pub fn session_keys(&self) -> io::Result<SessionKeys> {
        if self.conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the collective needs TLS 1.3"));
        }
        SessionKeys::export(&self.conn)
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut stream = self.stream;
        while self.conn.wants_write() {
            self.conn.write_tls(&mut stream)?;
        }
        Ok(())
    }

    /// Reads exactly one record from the socket and processes it; a refused certificate or any
    /// other TLS error sends its alert and fails.
    fn read_record(&mut self) -> io::Result<()> {
        let mut record = vec![0u8; RECORD_HEADER];
        super::conn::read_full(self.stream, &mut record)?;
        let len = u16::from_be_bytes([record[3], record[4]]) as usize;
        if len > MAX_RECORD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a TLS record (plaintext on a TLS collective?)"));
        }
        record.resize(RECORD_HEADER + len, 0);
        super::conn::read_full(self.stream, &mut record[RECORD_HEADER..])?;
        let mut rest = &record[..];
        while !rest.is_empty() {
            self.conn.read_tls(&mut rest)?;
        }
        if let Err(e) = self.conn.process_new_packets() {
            // Tell the peer why (best effort) before failing.
            let _ = self.flush();
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
        }
        Ok(())
    }
}
