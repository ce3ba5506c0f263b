//! `.npy` files: round trips in both dtypes and header versions, the exact layout NumPy writes,
//! and malformed files refused with typed errors.

use enff::io::npy::{
    decode, encode, encode_with_version, read_npy, write_npy, NpyDtype, NpyProblem, NpyVersion,
};
use enff::Error;

/// Deterministic values with varied exponents and signs (no RNG dependency).
fn values(k: usize) -> Vec<f32> {
    (0..k)
        .map(|i| {
            let x = (i as f32 * 0.618_034).fract() - 0.5;
            x * 10f32.powi((i % 7) as i32 - 3)
        })
        .collect()
}

#[test]
fn round_trip_f4_and_f8_in_v1_and_v2_headers_1d_and_2d() {
    for dtype in [NpyDtype::F4, NpyDtype::F8] {
        for version in [NpyVersion::V1, NpyVersion::V2] {
            for shape in [vec![1usize], vec![17], vec![3, 5], vec![1, 9], vec![20, 40]] {
                let count: usize = shape.iter().product();
                let data = values(count);
                let bytes = encode_with_version(&shape, &data, dtype, version).unwrap();
                assert_eq!(bytes[6], if version == NpyVersion::V1 { 1 } else { 2 });
                let back = decode(&bytes).unwrap();
                assert_eq!(back.shape, shape);
                assert_eq!(back.dtype, dtype);
                // f32 → f64 → f32 is exact: the round trip is bitwise in both dtypes.
                let same = back
                    .data
                    .iter()
                    .zip(&data)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{dtype:?} {version:?} {shape:?}");
                assert_eq!(
                    bytes.len() % 64,
                    (count * dtype.size()) % 64,
                    "data starts on a 64-byte boundary"
                );
            }
        }
    }
}

#[test]
fn files_round_trip_and_leave_no_temporary_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.npy");
    let data = values(12);
    write_npy(&path, &[4, 3], &data, NpyDtype::F8).unwrap();
    let a = read_npy(&path).unwrap();
    assert_eq!((a.shape.clone(), a.dtype), (vec![4, 3], NpyDtype::F8));
    assert_eq!(a.rows_cols(), (4, 3));
    assert_eq!(a.data, data);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a.npy")]);
    // Writing into a folder that does not exist fails with an I/O error naming the file.
    let missing = dir.path().join("no/such/dir/b.npy");
    match write_npy(&missing, &[3], &data[..3], NpyDtype::F4) {
        Err(Error::Io { path, .. }) => assert!(path.contains("b.npy"), "{path}"),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(!missing.exists());
}

#[test]
fn header_is_byte_for_byte_what_numpy_writes() {
    // np.save(f, np.zeros((2, 3), np.float32)) writes this 128-byte header (format 1.0).
    let bytes = encode(&[2, 3], &[0.0; 6], NpyDtype::F4).unwrap();
    let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
    let mut expected = b"\x93NUMPY\x01\x00".to_vec();
    expected.extend_from_slice(&118u16.to_le_bytes());
    expected.extend_from_slice(dict.as_bytes());
    expected.extend(std::iter::repeat_n(b' ', 118 - dict.len() - 1));
    expected.push(b'\n');
    assert_eq!(&bytes[..128], &expected[..]);
    assert_eq!(bytes.len(), 128 + 24);
    // A 1-D shape is written with its trailing comma, as Python prints a 1-tuple.
    let one = encode(&[5], &[0.0; 5], NpyDtype::F8).unwrap();
    let text = String::from_utf8_lossy(&one[10..128]);
    assert!(text.contains("'shape': (5,)"), "{text}");
    assert!(text.contains("'descr': '<f8'"), "{text}");
}

/// A file with the given header dict and `data_bytes` bytes of data.
fn with_header(dict: &str, data_bytes: usize) -> Vec<u8> {
    let mut h = dict.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(h.as_bytes());
    out.extend(std::iter::repeat_n(0u8, data_bytes));
    out
}

#[test]
fn malformed_files_give_typed_problems() {
    let good = encode(&[4, 5], &values(20), NpyDtype::F4).unwrap();
    // Truncated: the last value is cut.
    match decode(&good[..good.len() - 3]) {
        Err(NpyProblem::Truncated { expected, got }) => {
            assert_eq!((expected, got), (80, 77));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    // Truncated inside the header.
    assert!(matches!(decode(&good[..40]), Err(NpyProblem::BadHeader(_))));
    // Extra bytes after the data.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4]);
    assert!(matches!(
        decode(&long),
        Err(NpyProblem::TrailingBytes {
            expected: 80,
            got: 84
        })
    ));
    // Not an npy file at all.
    assert_eq!(decode(b"PK\x03\x04 zip file"), Err(NpyProblem::NotNpy));
    // Version 9.0.
    let mut v9 = good.clone();
    v9[6] = 9;
    assert!(matches!(
        decode(&v9),
        Err(NpyProblem::UnsupportedVersion { major: 9, .. })
    ));
    type Case = (&'static str, usize, fn(&NpyProblem) -> bool);
    let cases: [Case; 7] = [
        (
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 2), }",
            32,
            |p| matches!(p, NpyProblem::Dtype(d) if d == "<i8"),
        ),
        (
            "{'descr': '|i1', 'fortran_order': False, 'shape': (4,), }",
            4,
            |p| matches!(p, NpyProblem::Dtype(d) if d == "|i1"),
        ),
        (
            "{'descr': '>f4', 'fortran_order': False, 'shape': (2, 2), }",
            16,
            |p| matches!(p, NpyProblem::BigEndian(_)),
        ),
        (
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
            16,
            |p| matches!(p, NpyProblem::FortranOrder),
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 2), }",
            32,
            |p| matches!(p, NpyProblem::Rank(s) if s == &vec![2, 2, 2]),
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
            4,
            |p| matches!(p, NpyProblem::Rank(s) if s.is_empty()),
        ),
        ("{'descr': '<f4', 'fortran_order': False, }", 4, |p| {
            matches!(p, NpyProblem::BadHeader(_))
        }),
    ];
    for (dict, data, ok) in cases {
        let r = decode(&with_header(dict, data));
        match r {
            Err(p) => {
                assert!(ok(&p), "{dict}: unexpected problem {p:?}");
                // Every problem says what to do.
                assert!(p.to_string().len() > 30, "{p}");
            }
            Ok(a) => panic!("{dict}: accepted as {a:?}"),
        }
    }
    // A shape whose byte count overflows is refused before any allocation.
    let huge = with_header(
        "{'descr': '<f8', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
        8,
    );
    assert!(decode(&huge).is_err());
}

#[test]
fn reading_a_malformed_file_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("forecast.npy");
    std::fs::write(
        &path,
        with_header(
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2, 2), }",
            16,
        ),
    )
    .unwrap();
    match read_npy(&path) {
        Err(e @ Error::Npy { .. }) => {
            let text = e.to_string();
            assert!(text.contains("forecast.npy"), "{text}");
            assert!(text.contains("<i4") && text.contains("float32"), "{text}");
        }
        other => panic!("expected Error::Npy, got {other:?}"),
    }
    match read_npy(&dir.path().join("absent.npy")) {
        Err(Error::Io { path, .. }) => assert!(path.contains("absent.npy")),
        other => panic!("expected Error::Io, got {other:?}"),
    }
}
