//! Body encoding primitives: a bounds-checked reader and an appending writer.

use settlegate_types::{Currency, UserIdType, UserKey};

/// A body that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body ended early.
    #[error("body truncated at {0}")]
    Truncated(&'static str),
    /// Bytes left over after the last field.
    #[error("trailing bytes after the body")]
    Trailing,
    /// A field's value is invalid.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Reads fields from a body, never past its end.
pub struct Reader<'a> {
    buf: &'a [u8],
    /// Whether a `user` read so far had an ID that does not fit its type (see [`Reader::user`]).
    misfit_user: bool,
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, misfit_user: false }
    }

    /// `n` raw bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], BodyError> {
        if self.buf.len() < n {
            return Err(BodyError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], BodyError> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }

    /// `u8`.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, BodyError> {
        Ok(self.array::<1>(what)?[0])
    }
    /// `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, BodyError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    /// `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, BodyError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    /// `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, BodyError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    /// `i64`.
    pub fn i64(&mut self, what: &'static str) -> Result<i64, BodyError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    /// `u128`.
    pub fn u128(&mut self, what: &'static str) -> Result<u128, BodyError> {
        Ok(u128::from_be_bytes(self.array(what)?))
    }
    /// A boolean byte: 0 or 1.
    pub fn flag(&mut self, what: &'static str) -> Result<bool, BodyError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(BodyError::Invalid(what)),
        }
    }
    /// `str8`.
    pub fn str8(&mut self, what: &'static str) -> Result<&'a str, BodyError> {
        let len = self.u8(what)? as usize;
        std::str::from_utf8(self.take(len, what)?).map_err(|_| BodyError::Invalid(what))
    }
    /// `bytes16`.
    pub fn bytes16(&mut self, what: &'static str) -> Result<&'a [u8], BodyError> {
        let len = self.u16(what)? as usize;
        self.take(len, what)
    }
    /// A `user`: type byte and `str8` ID. An unknown type byte, or an ID that is not UTF-8,
    /// does not parse. An ID that parses but does not fit its type (or is not 1–64 bytes) is
    /// a well-formed field with a wrong value: it reads as a placeholder user, and
    /// [`Reader::misfit_user`] then says so, for the caller to refuse the request once the
    /// whole body parsed (`REFUSED` 51, `InvalidUserId`).
    pub fn user(&mut self) -> Result<UserKey, BodyError> {
        let id_type = UserIdType::from_u8(self.u8("user_id_type")?)
            .ok_or(BodyError::Invalid("user_id_type"))?;
        let id = self.str8("user_id")?;
        match UserKey::new(id_type, id) {
            Ok(user) => Ok(user),
            Err(_) => {
                self.misfit_user = true;
                Ok(UserKey::new(UserIdType::InherentNumber, "0").expect("a valid user ID"))
            }
        }
    }
    /// A currency: three upper-case ASCII letters.
    pub fn currency(&mut self) -> Result<Currency, BodyError> {
        Currency::from_bytes(self.array("currency")?).map_err(|_| BodyError::Invalid("currency"))
    }
    /// A `u8` count, checked against `max` before anything is allocated.
    pub fn count8(&mut self, what: &'static str, max: usize) -> Result<usize, BodyError> {
        let count = self.u8(what)? as usize;
        if count > max {
            return Err(BodyError::Invalid(what));
        }
        Ok(count)
    }
    /// Whether a `user` read so far had an ID that does not fit its type.
    pub fn misfit_user(&self) -> bool {
        self.misfit_user
    }
    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    /// Fails if bytes are left.
    pub fn finish(self) -> Result<(), BodyError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(BodyError::Trailing)
        }
    }
}

/// Appends fields to a body.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    /// `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    /// `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// `u32`.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// `i64`.
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// `u128`.
    pub fn u128(&mut self, v: u128) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// Raw bytes.
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// `str8`; text over 255 bytes is cut at a character boundary (only free-text details
    /// can be that long: every identifier is validated shorter).
    pub fn str8(&mut self, v: &str) -> &mut Self {
        let mut end = v.len().min(255);
        while !v.is_char_boundary(end) {
            end -= 1;
        }
        self.u8(end as u8).raw(&v.as_bytes()[..end])
    }
    /// `bytes16`.
    ///
    /// # Panics
    /// Over 65,535 bytes: callers pass records bounded far below.
    pub fn bytes16(&mut self, v: &[u8]) -> &mut Self {
        let len = u16::try_from(v.len()).expect("bytes16 over 65535");
        self.u16(len).raw(v)
    }
    /// A `user`.
    pub fn user(&mut self, user: &UserKey) -> &mut Self {
        self.u8(user.id_type() as u8).str8(user.id())
    }
    /// A currency.
    pub fn currency(&mut self, currency: Currency) -> &mut Self {
        self.raw(&currency.bytes())
    }
    /// A flag.
    pub fn flag(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
}

/// A field that is present only when its flag says so: `Some(value)` when `has`, else `None`,
/// provided the value is then the zero the protocol puts in its place. A non-zero value under
/// a cleared flag is refused: the body would not re-encode to the same bytes.
pub fn present_or_zero<T: PartialEq + Default>(
    has: bool,
    value: T,
    what: &'static str,
) -> Result<Option<T>, BodyError> {
    if has {
        Ok(Some(value))
    } else if value == T::default() {
        Ok(None)
    } else {
        Err(BodyError::Invalid(what))
    }
}
