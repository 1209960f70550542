//! Parallel gzip, the way pigz's independent mode (`pigz -i`) writes it: the input is cut into
//! fixed-size chunks, each compressed on its own into raw deflate ended by a sync flush (so it
//! ends on a byte boundary and the next chunk's blocks can follow it), and the chunks are
//! concatenated between one gzip header and one trailer. The trailer's CRC-32 is the chunks' CRCs
//! combined in order (crc32fast's `combine`). Chunks are cut at fixed offsets, so the output is
//! the same whatever the number of threads.
//!
//! flate2 has no multi-threaded encoder, and a gzip member can only be split this way by driving
//! its raw deflate stream by hand, hence this module.

use std::io::Write;

use flate2::{Compress, Compression, FlushCompress, Status};

use crate::error::{Code, Error, Result};

/// gzip's default level (`tar -z`, `gzip`), which GCP's documentation uses.
pub(crate) const LEVEL: u32 = 6;

/// A compressed chunk: raw deflate ending in a sync flush, and the CRC-32 of its input.
pub(crate) struct Chunk {
    pub(crate) deflated: Vec<u8>,
    crc: crc32fast::Hasher,
    len: u64,
}

/// Compresses one chunk of the input on its own (no dictionary from the previous chunk).
pub(crate) fn compress(input: &[u8], level: u32) -> Result<Chunk> {
    let mut z = Compress::new(Compression::new(level), false);
    // Deflate's worst case is a few bytes per stored block beyond the input: with this much room
    // one call compresses the whole chunk, so the output never depends on buffer sizes.
    let mut out = Vec::with_capacity(input.len() + input.len() / 16 + 1024);
    loop {
        let consumed = z.total_in() as usize;
        let status = z
            .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
            .map_err(|e| Error::new(Code::Internal, format!("deflate: {e}")))?;
        let done = z.total_in() as usize == input.len();
        // A sync flush is complete when the compressor left room in the output.
        if done && out.len() < out.capacity() {
            break;
        }
        if status == Status::BufError || out.len() == out.capacity() {
            out.reserve(64 << 10);
        }
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(input);
    Ok(Chunk {
        deflated: out,
        crc,
        len: input.len() as u64,
    })
}

/// One gzip member written chunk by chunk, in order.
pub(crate) struct Member<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    len: u64,
}

/// The empty final deflate block (fixed Huffman codes, BFINAL set, end-of-block at once).
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

impl<W: Write> Member<W> {
    /// Starts the member: the gzip header with no name and no timestamp (MTIME 0), so that the
    /// same input gives the same bytes.
    pub(crate) fn start(mut out: W) -> std::io::Result<Self> {
        // ID1 ID2 CM=deflate FLG=0 MTIME=0 XFL=0 OS=3 (Unix), as gzip writes it.
        out.write_all(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3])?;
        Ok(Member {
            out,
            crc: crc32fast::Hasher::new(),
            len: 0,
        })
    }

    /// Appends the next chunk.
    pub(crate) fn push(&mut self, chunk: &Chunk) -> std::io::Result<()> {
        self.out.write_all(&chunk.deflated)?;
        self.crc.combine(&chunk.crc);
        self.len += chunk.len;
        Ok(())
    }

    /// Ends the deflate stream and writes the trailer (CRC-32, length mod 2^32).
    pub(crate) fn finish(mut self) -> std::io::Result<W> {
        self.out.write_all(&FINAL_BLOCK)?;
        self.out.write_all(&self.crc.finalize().to_le_bytes())?;
        self.out.write_all(&(self.len as u32).to_le_bytes())?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gzip_of(input: &[u8], chunk: usize) -> Vec<u8> {
        let mut m = Member::start(Vec::new()).unwrap();
        for c in input.chunks(chunk) {
            m.push(&compress(c, LEVEL).unwrap()).unwrap();
        }
        m.finish().unwrap()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn chunks_compressed_apart_make_one_gzip_member_that_reads_back() {
        // Text, noise (incompressible: stored blocks) and zeros.
        let mut input = Vec::new();
        for i in 0..20_000u32 {
            input.extend_from_slice(format!("line {i} of the disk\n").as_bytes());
        }
        let mut x = 0x2545_f491_u32;
        for _ in 0..300_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            input.push(x as u8);
        }
        input.extend(std::iter::repeat_n(0u8, 100_000));
        for chunk in [1, 4096, 65536, 1 << 20] {
            let gz = gzip_of(&input, chunk);
            assert_eq!(gunzip(&gz), input, "chunk {chunk}");
        }
    }

    #[test]
    fn an_empty_input_is_a_valid_empty_member() {
        let gz = gzip_of(&[], 4096);
        assert!(gunzip(&gz).is_empty());
        assert_eq!(&gz[gz.len() - 8..], &[0; 8]);
    }

    #[test]
    fn the_trailer_holds_the_crc_of_the_whole_input() {
        let input: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let gz = gzip_of(&input, 30_000);
        let crc = u32::from_le_bytes(gz[gz.len() - 8..gz.len() - 4].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&input));
    }
}
