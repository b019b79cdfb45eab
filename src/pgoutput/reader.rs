//! A checked big-endian cursor over one message's bytes.
//!
//! Every read names the field it is for (`context`), so a short or malformed message is
//! reported as "which field of which message", not as a bare offset.

use bytes::Bytes;

use super::DecodeError;
use crate::lsn::Lsn;

pub(super) struct Reader {
    buf: Bytes,
    pos: usize,
}

impl Reader {
    pub(super) fn new(buf: Bytes) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(super) fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }

    /// Fails unless `need` more bytes are there, without consuming them.
    pub(super) fn ensure(&self, need: usize, context: &'static str) -> Result<(), DecodeError> {
        let have = self.remaining();
        if need > have {
            return Err(DecodeError::UnexpectedEof {
                context,
                need,
                have,
            });
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, context: &'static str) -> Result<[u8; N], DecodeError> {
        let rest = self.rest();
        match rest.get(..N).and_then(|s| <[u8; N]>::try_from(s).ok()) {
            Some(a) => {
                self.pos += N;
                Ok(a)
            }
            None => Err(DecodeError::UnexpectedEof {
                context,
                need: N,
                have: rest.len(),
            }),
        }
    }

    pub(super) fn u8(&mut self, context: &'static str) -> Result<u8, DecodeError> {
        self.array::<1>(context).map(|[b]| b)
    }

    pub(super) fn i16(&mut self, context: &'static str) -> Result<i16, DecodeError> {
        self.array(context).map(i16::from_be_bytes)
    }

    pub(super) fn i32(&mut self, context: &'static str) -> Result<i32, DecodeError> {
        self.array(context).map(i32::from_be_bytes)
    }

    /// An Int32 that Postgres means as unsigned (xids, oids).
    pub(super) fn u32(&mut self, context: &'static str) -> Result<u32, DecodeError> {
        self.array(context).map(u32::from_be_bytes)
    }

    pub(super) fn i64(&mut self, context: &'static str) -> Result<i64, DecodeError> {
        self.array(context).map(i64::from_be_bytes)
    }

    pub(super) fn u64(&mut self, context: &'static str) -> Result<u64, DecodeError> {
        self.array(context).map(u64::from_be_bytes)
    }

    pub(super) fn lsn(&mut self, context: &'static str) -> Result<Lsn, DecodeError> {
        self.u64(context).map(Lsn)
    }

    /// An Int32 length or count; negative values are rejected rather than wrapped.
    pub(super) fn len_i32(&mut self, context: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(context)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { context, len })
    }

    /// An Int16 count; negative values are rejected rather than wrapped.
    pub(super) fn len_i16(&mut self, context: &'static str) -> Result<usize, DecodeError> {
        let len = self.i16(context)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength {
            context,
            len: i32::from(len),
        })
    }

    /// `len` bytes as a slice sharing the input buffer.
    pub(super) fn bytes(
        &mut self,
        len: usize,
        context: &'static str,
    ) -> Result<Bytes, DecodeError> {
        self.ensure(len, context)?;
        let end = self.pos + len;
        let out = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    /// A NUL-terminated UTF-8 string; the NUL is consumed and not returned.
    pub(super) fn string(&mut self, context: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul { context })?;
        let text = rest
            .get(..nul)
            .and_then(|raw| std::str::from_utf8(raw).ok())
            .ok_or(DecodeError::InvalidUtf8 { context })?
            .to_owned();
        self.pos += nul + 1;
        Ok(text)
    }

    /// A safe `Vec` capacity for `count` wire elements of at least `min_size` bytes each:
    /// a lying count in a short message must not make us reserve memory up front.
    pub(super) fn capacity_for(&self, count: usize, min_size: usize) -> usize {
        count.min(self.remaining() / min_size.max(1))
    }

    /// Fails if anything is left after the message named by `context`.
    pub(super) fn finish(&self, context: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { context, count }),
        }
    }
}
