//! NumPy `.npy` files: the array format of `np.save` / `np.load`, written from the format's
//! description (format versions 1.0, 2.0 and 3.0).
//!
//! A file is the magic string `\x93NUMPY`, a major and a minor version byte, the length of the
//! header (2 bytes little-endian in version 1, 4 bytes in versions 2 and 3), the header — a
//! Python dict literal such as `{'descr': '<f4', 'fortran_order': False, 'shape': (20, 40), }`
//! padded with spaces and ended by a newline so that the data starts on a 64-byte boundary —
//! and the raw values.
//!
//! enff reads little-endian `float32` (`<f4`) and `float64` (`<f8`) arrays in C order with one
//! or two dimensions; `float64` values are rounded to `float32`, the precision enff computes in.
//! Anything else is refused with an [`NpyProblem`] that says what was found and what to do.
//!
//! ```
//! use enff::io::npy::{decode, encode, NpyDtype};
//! # fn main() -> enff::Result<()> {
//! let bytes = encode(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], NpyDtype::F8)?;
//! let array = decode(&bytes).unwrap();
//! assert_eq!(array.shape, vec![2, 3]);
//! assert_eq!(array.dtype, NpyDtype::F8);
//! assert_eq!(array.data[4], 5.0);
//! # Ok(())
//! # }
//! ```

use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element types enff reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    /// Little-endian IEEE float32, `<f4`.
    F4,
    /// Little-endian IEEE float64, `<f8`.
    F8,
}

impl NpyDtype {
    /// The header's `descr` string.
    pub fn descr(self) -> &'static str {
        match self {
            NpyDtype::F4 => "<f4",
            NpyDtype::F8 => "<f8",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::F4 => 4,
            NpyDtype::F8 => 8,
        }
    }
}

/// Header layout to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyVersion {
    /// Version 1.0 (header length in 2 bytes; what `np.save` writes for ordinary arrays).
    V1,
    /// Version 2.0 (header length in 4 bytes).
    V2,
}

/// An array read from a `.npy` file, as f32 in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The shape (one or two dimensions).
    pub shape: Vec<usize>,
    /// The element type stored in the file.
    pub dtype: NpyDtype,
    /// The values, row-major, converted to f32.
    pub data: Vec<f32>,
}

impl NpyArray {
    /// The array as a matrix: a 1-D array of length `k` is one row `1 × k`.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [k] => (1, *k),
            [r, c] => (*r, *c),
            _ => (0, 0),
        }
    }

    /// The shape written as NumPy prints it, e.g. `(20, 40)` or `(40,)`.
    pub fn shape_text(&self) -> String {
        shape_text(&self.shape)
    }
}

pub use crate::error::{shape_text, NpyProblem};

impl std::error::Error for NpyProblem {}

/// Decodes the bytes of a `.npy` file.
pub fn decode(bytes: &[u8]) -> std::result::Result<NpyArray, NpyProblem> {
    if bytes.len() < 8 || &bytes[..6] != MAGIC {
        return Err(NpyProblem::NotNpy);
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (header_len, start) = match major {
        1 => {
            let b = bytes.get(8..10).ok_or(NpyProblem::BadHeader(
                "the file ends inside the header length".into(),
            ))?;
            (u16::from_le_bytes([b[0], b[1]]) as usize, 10usize)
        }
        2 | 3 => {
            let b = bytes.get(8..12).ok_or(NpyProblem::BadHeader(
                "the file ends inside the header length".into(),
            ))?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        _ => return Err(NpyProblem::UnsupportedVersion { major, minor }),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| {
            NpyProblem::BadHeader(format!(
                "the header announces {header_len} bytes but the file ends before"
            ))
        })?;
    let header = if major == 3 {
        String::from_utf8(header.to_vec())
            .map_err(|_| NpyProblem::BadHeader("the header is not UTF-8".into()))?
    } else {
        // Versions 1 and 2: latin-1, of which the dict uses only ASCII.
        header.iter().map(|&b| b as char).collect()
    };
    let (descr, fortran, shape) = parse_header(&header)?;
    let dtype = match descr.as_str() {
        "<f4" => NpyDtype::F4,
        "<f8" => NpyDtype::F8,
        d if d.starts_with('>') && (d.ends_with("f4") || d.ends_with("f8")) => {
            return Err(NpyProblem::BigEndian(descr))
        }
        _ => return Err(NpyProblem::Dtype(descr)),
    };
    if fortran {
        return Err(NpyProblem::FortranOrder);
    }
    if shape.is_empty() || shape.len() > 2 {
        return Err(NpyProblem::Rank(shape));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or_else(|| NpyProblem::BadHeader(format!("shape {} overflows", shape_text(&shape))))?;
    let data = &bytes[start + header_len..];
    let expected = (count as u64).saturating_mul(dtype.size() as u64);
    let got = data.len() as u64;
    if got < expected {
        return Err(NpyProblem::Truncated { expected, got });
    }
    if got > expected {
        return Err(NpyProblem::TrailingBytes { expected, got });
    }
    let values: Vec<f32> = match dtype {
        NpyDtype::F4 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        NpyDtype::F8 => data
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
    };
    Ok(NpyArray {
        shape,
        dtype,
        data: values,
    })
}

/// Encodes `data` (row-major, `shape` of one or two dimensions) as a `.npy` file, in format
/// version 1.0 (2.0 when the header would not fit).
pub fn encode(shape: &[usize], data: &[f32], dtype: NpyDtype) -> Result<Vec<u8>> {
    encode_with_version(shape, data, dtype, NpyVersion::V1)
}

/// [`encode`] with an explicit header version (version 1.0 falls back to 2.0 for headers over
/// 65535 bytes, which no 1-D or 2-D shape reaches).
pub fn encode_with_version(
    shape: &[usize],
    data: &[f32],
    dtype: NpyDtype,
    version: NpyVersion,
) -> Result<Vec<u8>> {
    if shape.is_empty() || shape.len() > 2 {
        return Err(Error::invalid(
            "npy shape",
            shape_text(shape),
            "enff writes 1-D and 2-D arrays",
        ));
    }
    let count = shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .unwrap_or(usize::MAX);
    if count != data.len() {
        return Err(Error::shape(
            "npy data",
            format!("{} = {count} values", shape_text(shape)),
            format!("{} values", data.len()),
        ));
    }
    let mut dict = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {}, }}",
        dtype.descr(),
        shape_text(shape)
    );
    let v2 = version == NpyVersion::V2 || dict.len() + 12 > u16::MAX as usize;
    let prefix = if v2 { 12 } else { 10 };
    // Pad with spaces so that the data starts on a 64-byte boundary, ending with a newline.
    let total = (prefix + dict.len() + 1).div_ceil(64) * 64;
    while prefix + dict.len() + 1 < total {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = Vec::with_capacity(total + data.len() * dtype.size());
    out.extend_from_slice(MAGIC);
    if v2 {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(dict.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    match dtype {
        NpyDtype::F4 => data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        NpyDtype::F8 => data
            .iter()
            .for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
    }
    Ok(out)
}

/// Reads a `.npy` file; a malformed one gives [`Error::Npy`] naming the file and the problem.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode(&bytes).map_err(|problem| Error::Npy {
        path: path.display().to_string(),
        problem,
    })
}

/// Writes a `.npy` file atomically (a temporary file in the same folder, then a rename), so no
/// partial file is ever left under `path`.
pub fn write_npy(path: &Path, shape: &[usize], data: &[f32], dtype: NpyDtype) -> Result<()> {
    let bytes = encode(shape, data, dtype)?;
    super::write_atomic(path, &bytes)
}

// ---- header parsing -----------------------------------------------------------------------------

/// A value of the header dict.
#[derive(Debug)]
enum Lit {
    Str(String),
    Bool(bool),
    Int(usize),
    Tuple(Vec<Lit>),
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn bad(&self, what: &str) -> NpyProblem {
        NpyProblem::BadHeader(format!("{what} at byte {}", self.i))
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && (self.s[self.i] as char).is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), NpyProblem> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.bad(&format!("expected `{}`", c as char)))
        }
    }

    fn value(&mut self) -> std::result::Result<Lit, NpyProblem> {
        match self.peek() {
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i] != q {
                    self.i += 1;
                }
                if self.i >= self.s.len() {
                    return Err(self.bad("unterminated string"));
                }
                let text = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                Ok(Lit::Str(text))
            }
            Some(b'(') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(b')') {
                        self.i += 1;
                        return Ok(Lit::Tuple(items));
                    }
                    items.push(self.value()?);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b')') => {}
                        _ => return Err(self.bad("expected `,` or `)` in the shape")),
                    }
                }
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                // Python 2 wrote long integers with an `L` suffix.
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                let v = text
                    .parse::<usize>()
                    .map_err(|_| self.bad("integer too large"))?;
                if self.s.get(self.i) == Some(&b'L') {
                    self.i += 1;
                }
                Ok(Lit::Int(v))
            }
            Some(_) => {
                for (word, v) in [("True", true), ("False", false)] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(Lit::Bool(v));
                    }
                }
                Err(self.bad("unexpected value"))
            }
            None => Err(self.bad("unexpected end")),
        }
    }
}

fn parse_header(text: &str) -> std::result::Result<(String, bool, Vec<usize>), NpyProblem> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
    };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if p.peek() == Some(b'}') {
            break;
        }
        let key = match p.value()? {
            Lit::Str(k) => k,
            _ => return Err(p.bad("a dict key must be a string")),
        };
        p.expect(b':')?;
        let value = p.value()?;
        match (key.as_str(), value) {
            ("descr", Lit::Str(s)) => descr = Some(s),
            ("descr", _) => {
                return Err(NpyProblem::Dtype(
                    "a structured dtype (not a plain float type)".into(),
                ))
            }
            ("fortran_order", Lit::Bool(b)) => fortran = Some(b),
            ("shape", Lit::Tuple(items)) => {
                let dims = items
                    .into_iter()
                    .map(|l| match l {
                        Lit::Int(v) => Ok(v),
                        _ => Err(NpyProblem::BadHeader(
                            "shape entries must be integers".into(),
                        )),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                shape = Some(dims);
            }
            (k @ ("fortran_order" | "shape"), _) => {
                return Err(NpyProblem::BadHeader(format!("`{k}` has the wrong type")))
            }
            (other, _) => {
                return Err(NpyProblem::BadHeader(format!("unknown key `{other}`")));
            }
        }
        match p.peek() {
            Some(b',') => p.i += 1,
            Some(b'}') => {}
            _ => return Err(p.bad("expected `,` or `}`")),
        }
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err(NpyProblem::BadHeader(
            "the dict needs `descr`, `fortran_order` and `shape`".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_64_byte_aligned_and_ends_with_newline() {
        for version in [NpyVersion::V1, NpyVersion::V2] {
            for shape in [vec![7usize], vec![3, 5], vec![123456, 7]] {
                let count: usize = shape.iter().product();
                let data = vec![0.5f32; count];
                let bytes = encode_with_version(&shape, &data, NpyDtype::F4, version).unwrap();
                let prefix = if version == NpyVersion::V1 { 10 } else { 12 };
                let header_len = if version == NpyVersion::V1 {
                    u16::from_le_bytes([bytes[8], bytes[9]]) as usize
                } else {
                    u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize
                };
                assert_eq!((prefix + header_len) % 64, 0);
                assert_eq!(bytes[prefix + header_len - 1], b'\n');
                assert_eq!(bytes.len(), prefix + header_len + 4 * count);
            }
        }
    }

    #[test]
    fn parses_headers_as_numpy_writes_them() {
        let (d, f, s) =
            parse_header("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 4), }    \n")
                .unwrap();
        assert_eq!((d.as_str(), f, s), ("<f8", false, vec![3, 4]));
        let (_, _, s) =
            parse_header("{\"shape\": (5,), \"fortran_order\": True, \"descr\": \"<f4\"}").unwrap();
        assert_eq!(s, vec![5]);
        let (_, _, s) =
            parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L)}").unwrap();
        assert_eq!(s, vec![2, 3]);
        assert!(parse_header("{'descr': '<f4', 'shape': (2,)}").is_err());
        assert!(parse_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2,}").is_err());
        assert!(parse_header("not a dict").is_err());
    }
}
