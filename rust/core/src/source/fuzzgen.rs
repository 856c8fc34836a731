//! Structure-aware inputs for the PyTorch reader's fuzzer: a short program of bytes becomes a
//! whole `torch.save`-shaped archive whose pickle can run to megabytes of nesting, memo
//! references and MARKs (the shapes that crashed or ballooned the reader before), so the fuzzer
//! reaches them from a few dozen mutated bytes instead of needing megabyte inputs it would never
//! guess. Test support only: nothing in the library calls it.

/// Pickle pieces a program repeats: the opcodes a state dict uses, and the ones that nest, share
/// or open marks.
const PIECES: &[&[u8]] = &[
    b"(",
    b"\x85",
    b"\x86",
    b"\x87",
    b"t",
    b")",
    b"]",
    b"}",
    b"a",
    b"e",
    b"s",
    b"u",
    b"N",
    b"K\x01",
    b"J\xff\xff\xff\xff",
    b"X\x01\x00\x00\x00a",
    b"\x8c\x01w",
    b"q\x00",
    b"q\x01",
    b"\x94",
    b"h\x00",
    b"h\x01",
    b"r\x00\x00\x00\x00",
    b"j\x00\x00\x00\x00",
    b"b",
    b"R",
    b"Q",
    b"\x93",
    b"\x8c\x05torch\x8c\x0cFloatStorage\x93",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ccollections\nOrderedDict\n)R",
    b"0",
    b".",
];

/// One tensor entry of a state dict, `w<i>` → 4 floats of storage "0": what `torch.save` writes.
fn tensor(out: &mut Vec<u8>, i: u8) {
    out.extend(b"X\x02\x00\x00\x00w");
    out.push(b'0' + i % 10);
    out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
    out.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ");
    out.extend(b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR");
}

/// Largest pickle a program may build: past a megabyte, every limit of the unpickler is
/// within reach (a million opcodes).
const MAX_PICKLE: usize = (1 << 20) + 4096;

/// The archive described by `program`.
pub fn archive(program: &[u8]) -> Vec<u8> {
    let mut pkl = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(".to_vec();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let (mut order, mut folder) = (None, "archive");
    let mut it = program.iter().copied();
    while let Some(op) = it.next() {
        match op % 8 {
            0 => {
                let n = it.next().unwrap_or(0) as usize;
                pkl.extend(it.by_ref().take(n));
            }
            1 | 2 => {
                let piece = PIECES[it.next().unwrap_or(0) as usize % PIECES.len()];
                let hi = if op % 8 == 2 {
                    it.next().unwrap_or(0) as usize
                } else {
                    0
                };
                let count = (hi << 8 | it.next().unwrap_or(1) as usize) << (op >> 5);
                let room = (MAX_PICKLE - pkl.len().min(MAX_PICKLE)) / piece.len();
                pkl.extend_from_slice(&piece.repeat(count.min(room)));
            }
            3 => tensor(&mut pkl, it.next().unwrap_or(0)),
            4 => order = Some(if op & 0x10 != 0 { "big" } else { "little" }),
            5 => folder = if op & 0x10 != 0 { "a" } else { "archive" },
            6 => files.push((format!("{folder}/data/{}", op >> 4), vec![0; 16])),
            _ => files.push((
                format!("{}/data.pkl", if op & 0x10 != 0 { "b" } else { folder }),
                Vec::new(),
            )),
        }
    }
    pkl.extend(b"u.");
    let mut all = vec![
        ("archive/data.pkl".to_owned(), pkl),
        ("archive/data/0".to_owned(), vec![0; 16]),
    ];
    if let Some(o) = order {
        all.push(("archive/byteorder".to_owned(), o.as_bytes().to_vec()));
    }
    all.extend(files);
    stored_zip(&all)
}

/// A zip archive of `files`, stored uncompressed, as `torch.save` lays one out (no zip64).
pub fn stored_zip(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let (mut out, mut dir) = (Vec::new(), Vec::new());
    for (name, data) in files {
        let off = out.len() as u32;
        let (n, len) = (name.len() as u16, data.len() as u32);
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend(len.to_le_bytes());
        out.extend(len.to_le_bytes());
        out.extend(n.to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(data);
        dir.extend(0x0201_4b50u32.to_le_bytes());
        dir.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        dir.extend(len.to_le_bytes());
        dir.extend(len.to_le_bytes());
        dir.extend(n.to_le_bytes());
        dir.extend([0; 12]);
        dir.extend(off.to_le_bytes());
        dir.extend(name.as_bytes());
    }
    let (off, count) = (out.len() as u32, files.len() as u16);
    out.extend(&dir);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0; 4]);
    out.extend(count.to_le_bytes());
    out.extend(count.to_le_bytes());
    out.extend((dir.len() as u32).to_le_bytes());
    out.extend(off.to_le_bytes());
    out.extend([0; 2]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_build_readable_and_hostile_archives() {
        // Two tensors: a valid checkpoint.
        let h = super::super::pytorch::parse("t", &archive(&[3, 0, 3, 1])).unwrap();
        assert_eq!(h.iter().count(), 2);
        // A million TUPLE1s: an error, not a stack overflow.
        let deep = archive(&[2, 5, 0, 1, 0x82, 1, 0xFF, 0xFF]);
        assert!(deep.len() > 1 << 20);
        let e = super::super::pytorch::parse("t", &deep).unwrap_err();
        assert!(e.to_string().contains("levels deep"), "{e}");
        // Big-endian storages, a second pickle (in another folder or this one): refused.
        for p in [
            &[3, 0, 4 | 0x10][..],
            &[3, 0, 7 | 0x10],
            &[3, 0, 5 | 0x10, 7],
        ] {
            assert!(
                super::super::pytorch::parse("t", &archive(p)).is_err(),
                "{p:?}"
            );
        }
    }
}
