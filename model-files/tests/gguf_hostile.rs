//! The GGUF header reader against broken and hostile files: every truncation, counts and
//! lengths that claim more than the file holds, arrays nested too deep, and a few thousand
//! seeded random corruptions of a valid header. Each must end in `Ok` or a typed error — no
//! panic, no allocation the file's size does not justify — and whatever is accepted must
//! describe tensors that lie inside the file.

use tessera_model_files::gguf::ggml_block;
use tessera_model_files::GgufHeader;

/// A small valid GGUF v3 file: three metadata entries (a string, an alignment, an array of
/// strings) and one f32 tensor of 32 elements.
fn valid() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&3u64.to_le_bytes()); // metadata entries
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    string(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    string(&mut b, "llama");
    string(&mut b, "general.alignment");
    b.extend_from_slice(&4u32.to_le_bytes());
    b.extend_from_slice(&32u32.to_le_bytes());
    string(&mut b, "tokenizer.ggml.tokens");
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    string(&mut b, "a");
    string(&mut b, "b");
    string(&mut b, "w");
    b.extend_from_slice(&1u32.to_le_bytes()); // dimensions
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // f32
    b.extend_from_slice(&0u64.to_le_bytes()); // offset
    b.resize(b.len().div_ceil(32) * 32 + 32 * 4, 0);
    b
}

fn parse(bytes: &[u8]) -> Result<GgufHeader, tessera_model_files::FilesError> {
    GgufHeader::from_reader(bytes, bytes.len() as u64)
}

/// What an accepted header promises: every tensor ends inside the file.
fn check_accepted(header: &GgufHeader) {
    for (name, t) in &header.tensors {
        let (block, bytes) = ggml_block(t.ggml_type).expect("accepted tensors have known types");
        let elems: u64 = t.dims.iter().product();
        let end = header.data_offset + t.offset + elems / block * bytes;
        assert!(end <= header.file_len, "{name} ends at {end}, past {}", header.file_len);
    }
}

#[test]
fn the_valid_file_reads_and_every_truncation_is_an_error() {
    let bytes = valid();
    let header = parse(&bytes).expect("valid file");
    assert_eq!(header.string("general.architecture"), Some("llama"));
    check_accepted(&header);
    for cut in 0..bytes.len() {
        assert!(parse(&bytes[..cut]).is_err(), "a file cut at byte {cut} of {} was accepted", bytes.len());
    }
}

/// `valid()` with the u64 at `at` replaced.
fn with_u64(at: usize, value: u64) -> Vec<u8> {
    let mut bytes = valid();
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    bytes
}

#[test]
fn counts_and_lengths_past_the_file_are_errors() {
    // Tensor count, metadata count, the first key's length.
    for (at, what) in [(8, "tensor count"), (16, "metadata count"), (24, "key length")] {
        for value in [u64::MAX, u64::MAX / 2, 1 << 40, valid().len() as u64] {
            assert!(parse(&with_u64(at, value)).is_err(), "{what} {value} was accepted");
        }
    }
    // The string array's count: 2^40 strings cannot fit.
    let count_at = valid().windows(21).position(|w| w == b"tokenizer.ggml.tokens").expect("key") + 21 + 8;
    assert!(parse(&with_u64(count_at, 1 << 40)).is_err());
    // The tensor's dimension and offset put its data past the end.
    let tensor_at = valid().windows(9).rposition(|w| w == [1, 0, 0, 0, 0, 0, 0, 0, b'w']).expect("tensor name") + 9;
    assert!(parse(&with_u64(tensor_at + 4, 1 << 30)).is_err(), "a dimension past the file was accepted");
    assert!(parse(&with_u64(tensor_at + 4 + 8 + 4, 1 << 20)).is_err(), "an offset past the file was accepted");
    assert!(parse(&with_u64(tensor_at + 4 + 8 + 4, u64::MAX - 8)).is_err(), "an overflowing offset was accepted");
}

#[test]
fn arrays_nested_too_deep_are_an_error() {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'k');
    b.extend_from_slice(&9u32.to_le_bytes());
    for _ in 0..64 {
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
    }
    b.extend_from_slice(&[0; 64]);
    assert!(parse(&b).is_err());
}

/// xorshift64*: a fixed sequence, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_corruptions_never_panic_and_accepted_headers_stay_inside_the_file() {
    let base = valid();
    let mut rng = Rng(0x5EED_0F66_0900);
    let (mut accepted, mut refused) = (0, 0);
    for case in 0..20_000 {
        let mut bytes = base.clone();
        match rng.below(3) {
            // A few bytes flipped.
            0 => {
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(bytes.len());
                    bytes[at] ^= 1 << rng.below(8);
                }
            }
            // A whole word overwritten with something large or small.
            1 => {
                let at = rng.below(bytes.len() - 8);
                let value = if rng.below(2) == 0 { rng.next() } else { rng.next() % 64 };
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
            }
            // Cut short after a flip.
            _ => {
                let at = rng.below(bytes.len());
                bytes[at] = bytes[at].wrapping_add(1 + rng.below(255) as u8);
                bytes.truncate(rng.below(bytes.len()) + 1);
            }
        }
        match std::panic::catch_unwind(|| parse(&bytes)) {
            Ok(Ok(header)) => {
                check_accepted(&header);
                accepted += 1;
            }
            Ok(Err(_)) => refused += 1,
            Err(_) => panic!("case {case} panicked on {bytes:?}"),
        }
    }
    // Both outcomes happen: the corruptions reach the checks rather than all failing at the magic.
    assert!(accepted > 0 && refused > 5000, "{accepted} accepted, {refused} refused");
}

/// Seeded mutation fuzzing (see `tessera_mutate`): 100,000 mutations of the valid file. Each
/// header read ends in `Ok` or a typed error; an accepted header describes tensors inside the
/// file, and its metadata gives a tokenizer or a typed error.
#[test]
fn a_hundred_thousand_mutations_are_read_or_refused() {
    let accepted = tessera_mutate::Campaign::new("gguf header").run(&[valid()], |bytes| match parse(bytes) {
        Ok(header) => {
            check_accepted(&header);
            let _ = tessera_model_files::tokenizer::from_metadata(&header.metadata);
            true
        }
        Err(_) => false,
    });
    assert!(accepted > 1000, "mutations must also make files that read ({accepted})");
}
