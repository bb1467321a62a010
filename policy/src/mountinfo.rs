//! Reading the kernel's mount table (`/proc/self/mountinfo`) as text. Pure: the caller reads
//! the file; [`crate::HostFs::mounts_below`] is what the compiler asks of it.

use std::path::{Path, PathBuf};

/// One line of the mount table.
struct Entry {
    /// Device of the mounted filesystem (`major:minor`, the superblock's).
    dev: Option<(u32, u32)>,
    /// Mount point.
    point: PathBuf,
    /// Filesystem type.
    fstype: String,
}

fn entries(mountinfo: &str) -> Vec<Entry> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut f = left.split(' ');
            let dev = f.nth(2)?.split_once(':').and_then(|(ma, mi)| Some((ma.parse().ok()?, mi.parse().ok()?)));
            let point = PathBuf::from(unescape_octal(f.nth(1)?));
            let fstype = right.split(' ').next()?.to_string();
            Some(Entry { dev, point, fstype })
        })
        .collect()
}

/// The mount that holds `path`: the deepest mount point that contains it, and of several
/// mounts there the last listed, since a later mount hides an earlier one at the same place.
fn holder<'e>(all: &'e [Entry], path: &Path) -> Option<&'e Entry> {
    all.iter().filter(|e| path.starts_with(&e.point)).fold(None, |best: Option<&Entry>, e| match best {
        Some(b) if b.point.components().count() > e.point.components().count() => Some(b),
        _ => Some(e),
    })
}

/// The mount that holds `path`, then the mount points below `path`, each with its
/// filesystem type.
pub fn mounts_below(mountinfo: &str, path: &Path) -> Vec<(PathBuf, String)> {
    let all = entries(mountinfo);
    let held = holder(&all, path).map(|e| (e.point.clone(), e.fstype.clone()));
    let below = all.iter().filter(|e| e.point.starts_with(path) && e.point != path);
    held.into_iter().chain(below.map(|e| (e.point.clone(), e.fstype.clone()))).collect()
}

/// The device (major, minor) of the filesystem of the mount that holds `path`, as the kernel
/// names it (`super_block.s_dev`, which `stat` may not show: btrfs subvolumes report their
/// own).
pub fn holder_device(mountinfo: &str, path: &Path) -> Option<(u32, u32)> {
    holder(&entries(mountinfo), path)?.dev
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
                (PathBuf::from("/"), "ext4".to_string()),
                (PathBuf::from("/srv/chroot/proc"), "proc".to_string()),
                (PathBuf::from("/srv/my dir"), "tmpfs".to_string())
            ]
        );
        assert_eq!(mounts_below(mi, Path::new("/srvx")), vec![(PathBuf::from("/"), "ext4".to_string())]);
        // A grant below a kernel filesystem mounted above it: the holder is that filesystem.
        let held = mounts_below(mi, Path::new("/srv/chroot/proc/1"));
        assert_eq!(held, vec![(PathBuf::from("/srv/chroot/proc"), "proc".to_string())]);
        // The same point mounted twice: the later mount is the one seen.
        let over = format!("{mi}40 30 0:9 / /srv/chroot/proc rw - tmpfs tmpfs rw\n");
        assert_eq!(mounts_below(&over, Path::new("/srv/chroot/proc/x"))[0].1, "tmpfs");
        assert_eq!(holder_device(&over, Path::new("/srv/chroot/proc/x")), Some((0, 9)));
        assert_eq!(holder_device(mi, Path::new("/srv/my dir/s.sock")), Some((0, 7)));
        assert_eq!(holder_device(mi, Path::new("/etc")), Some((0, 5)));
        assert_eq!(unescape_octal("/a\\04"), "/a\\04");
    }
}
