//! The encrypted record layer of a TLS collective: after the mutual-TLS rendezvous, every byte
//! a rank sends travels in AES-256-GCM records, so tensors are neither readable nor alterable on
//! the wire.
//!
//! The connection does not stay inside rustls because the data path needs what a TLS session
//! object cannot give: the two directions of one socket used by different threads at once (the
//! engine thread reading while a sender thread writes), non-blocking partial writes, and reads
//! that spin before they block. So the handshake's exporter (RFC 8446 §7.5) derives one secret
//! per direction, and each direction is sealed or opened on its own here.
//!
//! A record is a 4-byte little-endian length, then the ciphertext and its 16-byte tag; the
//! length is the associated data. Nonces are the direction's IV XOR a record counter, as in
//! TLS 1.3, so they never repeat under one key, and both ends count records without saying so.
//! Every [`REKEY_RECORDS`] records a direction moves to a key derived from the last (HKDF), which
//! keeps the data under one AES-GCM key within TLS 1.3's limits however long a group lives.
//! A record that fails authentication, or claims a length no sender writes, is an error: the
//! group then fails as it does on any broken connection.

use std::io::{self, Read, Write};
use std::net::TcpStream;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;

/// Most plaintext in one record. Larger records would mean fewer tags, but the receiver holds a
/// whole record before it can release any of it.
pub(super) const RECORD_PLAINTEXT: usize = 64 * 1024;
const LEN_BYTES: usize = 4;
const TAG: usize = 16;
/// The largest record on the wire.
const MAX_RECORD: usize = LEN_BYTES + RECORD_PLAINTEXT + TAG;
/// Records under one key before the next is derived: at most 2^22 x 64 KiB, about 2^34 AES
/// blocks, below TLS 1.3's bound for AES-GCM (RFC 8446 §5.5). The unit tests cross it often.
#[cfg(not(test))]
const REKEY_RECORDS: u64 = 1 << 22;
#[cfg(test)]
const REKEY_RECORDS: u64 = 3;
/// Exporter label; its bytes are part of the protocol.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-tessera-collective-v1";

/// The two directions' secrets of one connection, derived from its TLS session.
pub(super) struct SessionKeys {
    send: [u8; 32],
    receive: [u8; 32],
}

impl SessionKeys {
    /// Both directions' secrets from the handshake's exporter. The connecting end sends with
    /// the first and receives with the second; the accepting end the other way round.
    pub fn export(conn: &rustls::Connection) -> io::Result<Self> {
        let mut both = [0u8; 64];
        conn.export_keying_material(&mut both, EXPORTER_LABEL, None).map_err(io::Error::other)?;
        let (mut first, mut second) = ([0u8; 32], [0u8; 32]);
        first.copy_from_slice(&both[..32]);
        second.copy_from_slice(&both[32..]);
        Ok(match conn {
            rustls::Connection::Client(_) => SessionKeys { send: first, receive: second },
            rustls::Connection::Server(_) => SessionKeys { send: second, receive: first },
        })
    }

    pub fn split(self) -> io::Result<(Sealer, Opener)> {
        Ok((Sealer::new(Direction::new(self.send)?), Opener::new(Direction::new(self.receive)?)))
    }
}

/// One direction's key, IV and record counter.
struct Direction {
    secret: [u8; 32],
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    records: u64,
    /// Keys this direction has moved through.
    generation: u64,
}

/// A length for HKDF-Expand.
struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// ring reports no detail; these only fail on lengths the constants here rule out.
fn crypto_error(what: &str) -> io::Error {
    io::Error::other(format!("collective record layer: {what} failed"))
}

fn expand(secret: &[u8; 32], label: &[u8], out: &mut [u8]) -> io::Result<()> {
    let prk = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, secret);
    prk.expand(&[label], Len(out.len())).and_then(|okm| okm.fill(out)).map_err(|_| crypto_error("HKDF-Expand"))
}

impl Direction {
    fn new(secret: [u8; 32]) -> io::Result<Self> {
        let mut key = [0u8; 32];
        let mut iv = [0u8; NONCE_LEN];
        expand(&secret, b"tessera collective key", &mut key)?;
        expand(&secret, b"tessera collective iv", &mut iv)?;
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).map_err(|_| crypto_error("AES-256-GCM key setup"))?);
        Ok(Direction { secret, key, iv, records: 0, generation: 0 })
    }

    /// The nonce of the next record, moving to the next key first when this one is used up.
    fn next_nonce(&mut self) -> io::Result<Nonce> {
        if self.records == REKEY_RECORDS {
            let mut next = [0u8; 32];
            expand(&self.secret, b"tessera collective next", &mut next)?;
            let generation = self.generation + 1;
            *self = Direction { generation, ..Direction::new(next)? };
        }
        let mut nonce = self.iv;
        for (n, c) in nonce[NONCE_LEN - 8..].iter_mut().zip(self.records.to_be_bytes()) {
            *n ^= c;
        }
        self.records += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The sending half. A record that could not be written whole stays here and stands for the
/// first bytes of whatever is written next: a caller that was told those bytes are not written
/// yet offers them again (from this thread or the sender thread), and they are not sealed twice.
pub(super) struct Sealer {
    direction: Direction,
    record: Vec<u8>,
    /// Bytes of `record` already on the wire.
    sent: usize,
    /// Plaintext bytes `record` holds while part of it is unsent; 0 when nothing is pending.
    pending: usize,
}

impl Sealer {
    fn new(direction: Direction) -> Self {
        Sealer { direction, record: Vec::with_capacity(MAX_RECORD), sent: 0, pending: 0 }
    }

    /// Seals the first record's worth of `plain` into `record`; returns how much it took.
    fn seal(&mut self, plain: &[u8]) -> io::Result<usize> {
        let n = plain.len().min(RECORD_PLAINTEXT);
        let len = ((n + TAG) as u32).to_le_bytes();
        self.record.clear();
        self.record.extend_from_slice(&len);
        self.record.extend_from_slice(&plain[..n]);
        let nonce = self.direction.next_nonce()?;
        let tag = self
            .direction
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(len), &mut self.record[LEN_BYTES..])
            .map_err(|_| crypto_error("sealing"))?;
        self.record.extend_from_slice(tag.as_ref());
        (self.sent, self.pending) = (0, n);
        Ok(n)
    }

    /// Checks that `bytes` can start with the pending record's plaintext.
    fn check_pending(&self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() < self.pending {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes offered where a pending record holds {}", bytes.len(), self.pending),
            ));
        }
        Ok(())
    }

    /// Writes `bytes` to a blocking stream.
    pub fn write_all(&mut self, mut stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
        if self.pending > 0 {
            self.check_pending(bytes)?;
            stream.write_all(&self.record[self.sent..])?;
            bytes = &bytes[self.pending..];
            self.pending = 0;
        }
        while !bytes.is_empty() {
            let n = self.seal(bytes)?;
            stream.write_all(&self.record)?;
            self.pending = 0;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// Writes at most one record of `bytes` to a non-blocking stream: `Ok(Some(n))` once the
    /// record holding the first `n` bytes is wholly on the wire, `Ok(None)` while the socket
    /// buffer is full (the bytes count as unwritten until then).
    pub fn try_write(&mut self, mut stream: &TcpStream, bytes: &[u8]) -> io::Result<Option<usize>> {
        if bytes.is_empty() {
            return Ok(Some(0));
        }
        if self.pending == 0 {
            self.seal(bytes)?;
        } else {
            self.check_pending(bytes)?;
        }
        while self.sent < self.record.len() {
            match stream.write(&self.record[self.sent..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "connection accepted no bytes")),
                Ok(n) => self.sent += n,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let n = self.pending;
        self.pending = 0;
        Ok(Some(n))
    }
}

/// The receiving half: reads records into a buffer, opens them in place and hands out their
/// plaintext.
pub(super) struct Opener {
    direction: Direction,
    buf: Vec<u8>,
    /// Received bytes not yet taken apart: `buf[start..end]`.
    start: usize,
    end: usize,
    /// The opened record's plaintext not yet handed out: `buf[plain_at..plain_end]`.
    plain_at: usize,
    plain_end: usize,
}

impl Opener {
    fn new(direction: Direction) -> Self {
        // Room for a whole record plus the next one's start, so one read can take both.
        Opener { direction, buf: vec![0u8; 2 * MAX_RECORD], start: 0, end: 0, plain_at: 0, plain_end: 0 }
    }

    fn take_plain(&mut self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.plain_end - self.plain_at);
        out[..n].copy_from_slice(&self.buf[self.plain_at..self.plain_at + n]);
        self.plain_at += n;
        n
    }

    /// Reads until a whole record is buffered and opens it. Returns false when the stream is
    /// non-blocking and has nothing more for now.
    fn open_next(&mut self, mut stream: &TcpStream) -> io::Result<bool> {
        loop {
            let held = self.end - self.start;
            if held >= LEN_BYTES {
                let mut len = [0u8; LEN_BYTES];
                len.copy_from_slice(&self.buf[self.start..self.start + LEN_BYTES]);
                let body = u32::from_le_bytes(len) as usize;
                if !(TAG..=RECORD_PLAINTEXT + TAG).contains(&body) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("a collective record of {body} bytes (not a Tessera TLS collective peer?)"),
                    ));
                }
                if held >= LEN_BYTES + body {
                    let at = self.start + LEN_BYTES;
                    let nonce = self.direction.next_nonce()?;
                    let plain = self.direction.key.open_in_place(nonce, Aad::from(len), &mut self.buf[at..at + body]).map_err(|_| {
                        io::Error::new(io::ErrorKind::InvalidData, "a collective record failed authentication (altered on the way?)")
                    })?;
                    (self.plain_at, self.plain_end) = (at, at + plain.len());
                    self.start = at + body;
                    return Ok(true);
                }
            }
            // Make room: the buffer only ever holds one partial record beyond what was opened,
            // and opened plaintext has been handed out before this thread reads again.
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.buf.len() - self.start < MAX_RECORD {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, held);
            }
            match stream.read(&mut self.buf[self.end..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed the connection")),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads what has arrived into `out` from a non-blocking stream: `Ok(None)` when nothing
    /// could be opened yet.
    pub fn try_read(&mut self, stream: &TcpStream, out: &mut [u8]) -> io::Result<Option<usize>> {
        if out.is_empty() {
            return Ok(Some(0));
        }
        if self.plain_at == self.plain_end && !self.open_next(stream)? {
            return Ok(None);
        }
        Ok(Some(self.take_plain(out)))
    }

    /// Fills `out` from a blocking stream.
    pub fn read_full(&mut self, stream: &TcpStream, mut out: &mut [u8]) -> io::Result<()> {
        while !out.is_empty() {
            if self.plain_at == self.plain_end {
                self.open_next(stream)?;
            }
            let n = self.take_plain(out);
            out = &mut out[n..];
        }
        Ok(())
    }
}

// Records carry no more than the AEAD allows in one call.
const _: () = assert!(RECORD_PLAINTEXT + TAG <= u32::MAX as usize && TAG == aead::MAX_TAG_LEN);

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use super::*;

    /// Both ends of a loopback connection, each with its sealer and opener as the rendezvous
    /// would give them.
    fn pair() -> ((TcpStream, Sealer, Opener), (TcpStream, Sealer, Opener)) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let (a, b) = ([7u8; 32], [9u8; 32]);
        let (cs, co) = SessionKeys { send: a, receive: b }.split().expect("keys");
        let (ss, so) = SessionKeys { send: b, receive: a }.split().expect("keys");
        ((client, cs, co), (server, ss, so))
    }

    fn pattern(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
    }

    #[test]
    fn messages_of_every_size_arrive_whole_across_key_changes() {
        let ((client, mut seal, _), (server, _, mut open)) = pair();
        let sizes = [1, 0, 15, RECORD_PLAINTEXT - 1, RECORD_PLAINTEXT, RECORD_PLAINTEXT + 1, 5 * RECORD_PLAINTEXT + 77, 3];
        let sent: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| pattern(n, i as u8)).collect();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                for msg in &sent {
                    seal.write_all(&client, msg).expect("write");
                }
                seal
            })
        };
        for msg in &sent {
            let mut got = vec![0u8; msg.len()];
            open.read_full(&server, &mut got).expect("read");
            assert_eq!(&got, msg);
        }
        let seal = writer.join().expect("writer");
        // 13 records went by: both ends moved through the same keys, in step.
        assert_eq!((open.direction.generation, open.direction.records), (4, 1));
        assert_eq!((seal.direction.generation, seal.direction.records), (4, 1));
    }

    #[test]
    fn a_record_left_half_written_is_finished_by_the_next_writer_not_sealed_twice() {
        let ((client, mut seal, _), (server, _, mut open)) = pair();
        client.set_nonblocking(true).expect("nonblocking");
        // Fill the socket buffers until a record stays half written, counting what was written.
        let stream = pattern(64 << 20, 1);
        let mut written = 0;
        while let Some(n) = seal.try_write(&client, &stream[written..]).expect("try_write") {
            written += n;
            assert!(written < stream.len(), "64 MiB fit in the socket buffers");
        }
        assert!(seal.pending > 0, "a full socket leaves a record pending");
        let rest = 3 * RECORD_PLAINTEXT;
        let reader = std::thread::spawn(move || {
            server.set_nonblocking(true).expect("nonblocking");
            let mut got = vec![0u8; written + rest];
            let mut at = 0;
            while at < got.len() {
                match open.try_read(&server, &mut got[at..]).expect("try_read") {
                    Some(n) => at += n,
                    None => std::thread::yield_now(),
                }
            }
            got
        });
        // The rest, from the pending record's first byte on, blocking, as the sender thread
        // would write it.
        client.set_nonblocking(false).expect("blocking");
        seal.write_all(&client, &stream[written..written + rest]).expect("write_all");
        assert_eq!(reader.join().expect("reader"), stream[..written + rest]);
    }

    #[test]
    fn an_altered_record_fails_authentication() {
        let ((mut client, mut seal, _), (server, _, mut open)) = pair();
        let mut record = Vec::new();
        seal.seal(&pattern(1000, 3)).expect("seal");
        record.extend_from_slice(&seal.record);
        record[LEN_BYTES + 500] ^= 1;
        client.write_all(&record).expect("write");
        let err = open.read_full(&server, &mut [0u8; 1000]).expect_err("altered record");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }

    #[test]
    fn a_record_from_the_wrong_key_or_out_of_order_fails_authentication() {
        let ((mut client, mut seal, _), (server, _, mut open)) = pair();
        seal.seal(&pattern(10, 1)).expect("seal");
        let first = seal.record.clone();
        seal.seal(&pattern(10, 2)).expect("seal");
        // The second record first: its nonce is not the one the receiver expects.
        client.write_all(&seal.record).expect("write");
        client.write_all(&first).expect("write");
        let err = open.read_full(&server, &mut [0u8; 10]).expect_err("reordered record");
        assert!(err.to_string().contains("failed authentication"), "{err}");
    }

    #[test]
    fn a_length_no_sender_writes_is_refused_before_reading_on() {
        for len in [0u32, (TAG - 1) as u32, (RECORD_PLAINTEXT + TAG + 1) as u32, u32::MAX] {
            let ((mut client, _, _), (server, _, mut open)) = pair();
            client.write_all(&len.to_le_bytes()).expect("write");
            let err = open.read_full(&server, &mut [0u8; 4]).expect_err("bad length");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert!(err.to_string().contains(&format!("record of {len} bytes")), "{err}");
        }
    }

    #[test]
    fn the_two_directions_use_different_keys() {
        let ((_client, mut client_seal, _), (_server, mut server_seal, _)) = pair();
        client_seal.seal(b"same bytes").expect("seal");
        server_seal.seal(b"same bytes").expect("seal");
        assert_ne!(client_seal.record, server_seal.record);
    }
}
