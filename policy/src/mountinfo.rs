//! Reading the kernel's mount table (`/proc/self/mountinfo`) as text. Pure: the caller reads
//! the file; [`crate::HostFs::mounts_below`] is what the compiler asks of it.

use std::path::{Path, PathBuf};

/// Mount points at or below `path` in mountinfo text, with their filesystem types.
pub fn mounts_below(mountinfo: &str, path: &Path) -> Vec<(PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = unescape_octal(left.split(' ').nth(4)?);
            let fstype = right.split(' ').next()?.to_string();
            Path::new(&point).starts_with(path).then(|| (PathBuf::from(point), fstype))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
pub fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|d| (b'0'..=b'7').contains(d)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_submounts_with_types() {
        let mi = "22 1 0:5 / / rw - ext4 /dev/vda rw\n\
                  30 22 0:6 / /srv/chroot/proc rw - proc proc rw\n\
                  31 22 0:7 / /srv/my\\040dir rw - tmpfs tmpfs rw\n";
        let found = mounts_below(mi, Path::new("/srv"));
        assert_eq!(
            found,
            vec![
                (PathBuf::from("/srv/chroot/proc"), "proc".to_string()),
                (PathBuf::from("/srv/my dir"), "tmpfs".to_string())
            ]
        );
        assert!(mounts_below(mi, Path::new("/srvx")).is_empty());
        assert_eq!(unescape_octal("/a\\04"), "/a\\04");
    }
}
