//! The directory of a zip archive, as much of it as a `torch.save` file needs: each entry's
//! name, where its bytes start and how many there are, and whether they are stored
//! uncompressed (so they can be read in place).
//!
//! Hand-written rather than the `zip` crate's reader because that reader tries every
//! end-of-central-directory signature in the file (quadratic: a 6.6 MB file of fake records
//! took 78 s, and it cannot be cancelled). Here the record is looked for only where the zip
//! specification allows it, in the last 64 KiB + 22 bytes, and every count is checked against
//! the bytes that would have to hold it before anything is allocated: linear time, memory
//! proportional to the file's directory, never more.

use std::collections::HashSet;

/// One entry of the central directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// Offset of the entry's data in the file.
    pub start: u64,
    /// Bytes of data (compressed size; equal to the size when stored).
    pub size: u64,
    /// Stored uncompressed and unencrypted.
    pub stored: bool,
}

type R<T> = std::result::Result<T, String>;

const EOCD: u32 = 0x0605_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const EOCD64: u32 = 0x0606_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;
/// The longest comment an end record can carry, so the farthest it can be from the end.
const MAX_COMMENT: usize = 0xFFFF;

/// Offsets come from the file: a saturated end (never wrapped) is simply out of range.
fn u16_at(b: &[u8], at: usize) -> R<u16> {
    b.get(at..at.saturating_add(2))
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| "the zip directory is cut short".into())
}

fn u32_at(b: &[u8], at: usize) -> R<u32> {
    b.get(at..at.saturating_add(4))
        .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
        .ok_or_else(|| "the zip directory is cut short".into())
}

fn u64_at(b: &[u8], at: usize) -> R<u64> {
    b.get(at..at.saturating_add(8))
        .map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
        .ok_or_else(|| "the zip directory is cut short".into())
}

fn usize_of(v: u64) -> R<usize> {
    usize::try_from(v).map_err(|_| "a zip offset beyond the address space".into())
}

/// Where the end-of-central-directory record starts: the last signature in the final
/// 64 KiB + 22 bytes whose comment ends within the file.
fn find_eocd(b: &[u8]) -> R<usize> {
    if b.len() < 22 {
        return Err("too short for a zip archive".into());
    }
    let lowest = b.len().saturating_sub(22 + MAX_COMMENT);
    (lowest..=b.len() - 22)
        .rev()
        .find(|&at| {
            u32_at(b, at).ok() == Some(EOCD)
                && u16_at(b, at + 20).is_ok_and(|c| at + 22 + c as usize <= b.len())
        })
        .ok_or_else(|| "no end-of-central-directory record in its last 64 KiB".into())
}

/// (entry count, directory offset, directory size) from the end records, zip64 included.
fn directory(b: &[u8]) -> R<(u64, u64, u64)> {
    let at = find_eocd(b)?;
    let count = u16_at(b, at + 10)? as u64;
    let size = u32_at(b, at + 12)? as u64;
    let offset = u32_at(b, at + 16)? as u64;
    if count != 0xFFFF && size != 0xFFFF_FFFF && offset != 0xFFFF_FFFF {
        return Ok((count, offset, size));
    }
    let loc = at
        .checked_sub(20)
        .filter(|&l| u32_at(b, l).ok() == Some(EOCD64_LOCATOR))
        .ok_or("a zip64 archive without its end-record locator")?;
    let rec = usize_of(u64_at(b, loc + 8)?)?;
    if u32_at(b, rec)? != EOCD64 {
        return Err("the zip64 end record is not where its locator says".into());
    }
    Ok((
        u64_at(b, rec + 32)?,
        u64_at(b, rec + 48)?,
        u64_at(b, rec + 40)?,
    ))
}

/// The zip64 extra field's values for the 32-bit fields that overflowed, in the spec's order
/// (size, compressed size, local header offset).
fn zip64_extra(extra: &[u8], mut need: [&mut u64; 3]) -> R<()> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = u16_at(extra, at)?;
        let len = u16_at(extra, at + 2)? as usize;
        let body = extra
            .get(at + 4..at + 4 + len)
            .ok_or("a zip extra field is cut short")?;
        if id == 1 {
            let mut k = 0;
            for v in need.iter_mut().filter(|v| ***v == 0xFFFF_FFFF) {
                **v = u64_at(body, k).map_err(|_| "a zip64 extra field is cut short")?;
                k += 8;
            }
            return Ok(());
        }
        at += 4 + len;
    }
    if need.iter().any(|v| **v == 0xFFFF_FFFF) {
        return Err("a zip64 entry without its zip64 extra field".into());
    }
    Ok(())
}

/// Every entry of the archive `b`, in directory order. Duplicate names are an error: readers
/// disagree on which of two equal names wins (torch takes the first), so no answer is right.
pub fn entries(b: &[u8]) -> R<Vec<Entry>> {
    let (count, offset, size) = directory(b)?;
    let dir = usize_of(offset)?
        .checked_add(usize_of(size)?)
        .filter(|&end| end <= b.len())
        .map(|end| &b[offset as usize..end])
        .ok_or("the zip central directory lies outside the file")?;
    // Each record takes at least 46 bytes: a count beyond that is a lie, refused before any
    // allocation.
    if count > dir.len() as u64 / 46 {
        return Err(format!(
            "the zip directory claims {count} entries but has room for {}",
            dir.len() / 46
        ));
    }
    let mut out = Vec::with_capacity(count as usize);
    let mut names = HashSet::with_capacity(count as usize);
    let mut at = 0usize;
    for i in 0..count {
        if u32_at(dir, at)? != CENTRAL {
            return Err(format!("zip directory record {i} is malformed"));
        }
        let flags = u16_at(dir, at + 8)?;
        let method = u16_at(dir, at + 10)?;
        let mut csize = u32_at(dir, at + 20)? as u64;
        let mut usize_ = u32_at(dir, at + 24)? as u64;
        let (n, m, k) = (
            u16_at(dir, at + 28)? as usize,
            u16_at(dir, at + 30)? as usize,
            u16_at(dir, at + 32)? as usize,
        );
        let mut local = u32_at(dir, at + 42)? as u64;
        let name = dir
            .get(at + 46..at + 46 + n)
            .ok_or("a zip entry name is cut short")?;
        let extra = dir
            .get(at + 46 + n..at + 46 + n + m)
            .ok_or("a zip extra field is cut short")?;
        zip64_extra(extra, [&mut usize_, &mut csize, &mut local])?;
        at += 46 + n + m + k;
        let name = std::str::from_utf8(name)
            .map_err(|_| format!("zip entry {i}'s name is not UTF-8"))?
            .to_owned();
        if !names.insert(name.clone()) {
            return Err(format!(
                "the archive holds '{name}' twice (readers disagree on which one counts)"
            ));
        }
        let l = usize_of(local)?;
        if u32_at(b, l).ok() != Some(LOCAL) {
            return Err(format!(
                "'{name}': its local header is not where the directory says"
            ));
        }
        let start = (l as u64)
            .checked_add(30 + u16_at(b, l + 26)? as u64 + u16_at(b, l + 28)? as u64)
            .ok_or("a zip offset overflows")?;
        let encrypted = flags & 1 != 0;
        out.push(Entry {
            name,
            start,
            size: csize,
            stored: method == 0 && !encrypted && csize == usize_,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A stored zip written by Python's rules, by hand: entries then directory then end.
    fn archive(files: &[(&str, &[u8])], comment: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut dir = Vec::new();
        for (name, data) in files {
            let off = out.len() as u32;
            out.extend(LOCAL.to_le_bytes());
            out.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend(0u32.to_le_bytes()); // crc (unchecked)
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((data.len() as u32).to_le_bytes());
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(0u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(*data);
            dir.extend(CENTRAL.to_le_bytes());
            dir.extend([20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            dir.extend(0u32.to_le_bytes());
            dir.extend((data.len() as u32).to_le_bytes());
            dir.extend((data.len() as u32).to_le_bytes());
            dir.extend((name.len() as u16).to_le_bytes());
            dir.extend([0; 8]);
            dir.extend([0; 4]);
            dir.extend(off.to_le_bytes());
            dir.extend(name.as_bytes());
        }
        let off = out.len() as u32;
        out.write_all(&dir).unwrap();
        out.extend(EOCD.to_le_bytes());
        out.extend([0; 4]);
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((files.len() as u16).to_le_bytes());
        out.extend((dir.len() as u32).to_le_bytes());
        out.extend(off.to_le_bytes());
        out.extend((comment.len() as u16).to_le_bytes());
        out.extend(comment);
        out
    }

    #[test]
    fn reads_entries_and_comments() {
        let z = archive(&[("a/x", b"hello"), ("a/y", b"")], b"a comment PK\x05\x06");
        let e = entries(&z).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(&z[e[0].start as usize..][..5], b"hello");
        assert!(e.iter().all(|e| e.stored));
    }

    /// The same archive as zip64 writes it (as torch does past 4 GiB): every size and offset
    /// in the extra fields, the 32-bit ones saturated, a zip64 end record and its locator.
    fn archive64(files: &[(&str, &[u8])]) -> Vec<u8> {
        let (mut out, mut dir) = (Vec::new(), Vec::new());
        for (name, data) in files {
            let off = out.len() as u64;
            let len = data.len() as u64;
            out.extend(LOCAL.to_le_bytes());
            out.extend([45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            out.extend([0xFF; 8]);
            out.extend((name.len() as u16).to_le_bytes());
            out.extend(20u16.to_le_bytes());
            out.extend(name.as_bytes());
            out.extend(1u16.to_le_bytes());
            out.extend(16u16.to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(len.to_le_bytes());
            out.extend(*data);
            dir.extend(CENTRAL.to_le_bytes());
            dir.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            dir.extend([0xFF; 8]);
            dir.extend((name.len() as u16).to_le_bytes());
            dir.extend(28u16.to_le_bytes());
            dir.extend([0; 10]);
            dir.extend([0xFF; 4]);
            dir.extend(name.as_bytes());
            dir.extend(1u16.to_le_bytes());
            dir.extend(24u16.to_le_bytes());
            dir.extend(len.to_le_bytes());
            dir.extend(len.to_le_bytes());
            dir.extend(off.to_le_bytes());
        }
        let cd = out.len() as u64;
        out.extend(&dir);
        let rec = out.len() as u64;
        out.extend(EOCD64.to_le_bytes());
        out.extend(44u64.to_le_bytes());
        out.extend([45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend((files.len() as u64).to_le_bytes());
        out.extend((files.len() as u64).to_le_bytes());
        out.extend((dir.len() as u64).to_le_bytes());
        out.extend(cd.to_le_bytes());
        out.extend(EOCD64_LOCATOR.to_le_bytes());
        out.extend(0u32.to_le_bytes());
        out.extend(rec.to_le_bytes());
        out.extend(1u32.to_le_bytes());
        out.extend(EOCD.to_le_bytes());
        out.extend([0; 4]);
        out.extend([0xFF; 4]);
        out.extend([0xFF; 8]);
        out.extend([0; 2]);
        out
    }

    #[test]
    fn reads_zip64_directories() {
        let z = archive64(&[("a/x", b"hello"), ("a/y", b"world!")]);
        let e = entries(&z).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(&z[e[0].start as usize..][..5], b"hello");
        assert_eq!(
            (e[1].size, &z[e[1].start as usize..][..6]),
            (6, &b"world!"[..])
        );
        assert!(e.iter().all(|e| e.stored));
        // A locator pointing elsewhere is an error, not a guess.
        let mut bad = z.clone();
        let n = bad.len();
        bad[n - 22 - 12..n - 22 - 4].copy_from_slice(&5u64.to_le_bytes());
        assert!(entries(&bad).unwrap_err().contains("zip64"));
    }

    #[test]
    fn refuses_duplicates_lies_and_far_records() {
        let z = archive(&[("a/x", b"1"), ("a/x", b"2")], b"");
        assert!(entries(&z).unwrap_err().contains("twice"));
        // A count the directory has no room for.
        let mut z = archive(&[("a/x", b"1")], b"");
        let n = z.len();
        z[n - 12..n - 10].copy_from_slice(&0xFFF0u16.to_le_bytes());
        assert!(entries(&z).unwrap_err().contains("claims"));
        // An end record farther than 64 KiB from the end is not looked for.
        let mut z = archive(&[("a/x", b"1")], b"");
        z.extend(vec![0u8; 70_000]);
        assert!(entries(&z).unwrap_err().contains("64 KiB"));
    }

    #[test]
    fn many_fake_end_records_take_linear_time() {
        // 6 MB of fake records: each is looked at once, within the last 64 KiB only.
        let fake: Vec<u8> = EOCD
            .to_le_bytes()
            .iter()
            .chain(&[0u8; 18])
            .copied()
            .collect();
        let z: Vec<u8> = fake.iter().cycle().take(6 << 20).copied().collect();
        // The last record reads as an empty directory; the quadratic search never ended.
        assert_eq!(entries(&z).map(|e| e.len()), Ok(0));
    }
}
