//! What a dynamic ELF program needs to start: its loader (`PT_INTERP`) and its shared
//! libraries (`DT_NEEDED`, transitively), found as glibc's loader finds them: `DT_RPATH`
//! (without `DT_RUNPATH`), `DT_RUNPATH`, `/etc/ld.so.cache`, then the default directories.
//!
//! Read with the `object` crate; nothing here runs the program (`ldd` would, through the
//! loader, which is unsafe on a program one does not trust).

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use agentd_policy::ElfDeps;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::read::ReadCache;
use object::{elf, Endianness, FileKind, ReadRef};

/// Most objects looked at for one program (a program and its libraries).
const MAX_OBJECTS: usize = 512;
/// Most files tried while searching for one program's libraries.
const MAX_PROBES: usize = 4096;
/// Most `DT_NEEDED` names, and run path entries, taken from one object.
const MAX_ENTRIES: usize = 256;
/// Largest file read as an ELF object.
const MAX_SIZE: u64 = 512 << 20;

/// Directories the loader searches last.
const DEFAULT_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib/aarch64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// The dynamic section of one object, as far as loading goes.
#[derive(Debug, Default)]
struct Object {
    machine: u16,
    interpreter: Option<String>,
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
}

fn read_object(path: &Path) -> Option<Object> {
    use std::os::unix::fs::OpenOptionsExt;
    // Non-blocking, so that a FIFO planted where the search looks cannot stall agentd; only
    // regular files are read.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_SIZE {
        return None;
    }
    // Only the headers and the dynamic section are read, not the whole file (libc is 2 MB,
    // and a call's plan looks at every library of its program).
    let cache = ReadCache::new(file);
    let data = &cache;
    match FileKind::parse(data).ok()? {
        FileKind::Elf32 => parse::<elf::FileHeader32<Endianness>, _>(data),
        FileKind::Elf64 => parse::<elf::FileHeader64<Endianness>, _>(data),
        _ => None,
    }
}

fn parse<'d, E: FileHeader<Endian = Endianness>, R: ReadRef<'d>>(data: R) -> Option<Object> {
    let header = E::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let mut out = Object { machine: header.e_machine(endian), ..Object::default() };
    for ph in header.program_headers(endian, data).ok()? {
        if let Ok(Some(interp)) = ph.interpreter(endian, data) {
            out.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, data).ok()?;
    if let Ok(Some((entries, link))) = sections.dynamic(endian, data) {
        let strings = sections.strings(endian, data, link).ok()?;
        for d in entries {
            let Some(tag) = d.tag32(endian) else { continue };
            let text = || {
                let at = d.val32(endian)?;
                strings.get(at).ok().map(|s| String::from_utf8_lossy(s).into_owned())
            };
            let split = |s: String| s.split(':').filter(|p| !p.is_empty()).map(String::from).collect::<Vec<_>>();
            match tag {
                elf::DT_NEEDED if out.needed.len() < MAX_ENTRIES => out.needed.extend(text()),
                elf::DT_RPATH if out.rpath.len() < MAX_ENTRIES => {
                    out.rpath.extend(text().map(split).unwrap_or_default())
                }
                elf::DT_RUNPATH if out.runpath.len() < MAX_ENTRIES => {
                    out.runpath.extend(text().map(split).unwrap_or_default())
                }
                _ => {}
            }
        }
    }
    Some(out)
}

/// The library paths listed in `/etc/ld.so.cache` (glibc's format "glibc-ld.so.cache1.1"),
/// name → paths, in the file's order.
fn read_cache(path: &Path) -> Vec<(String, String)> {
    const MAGIC: &[u8] = b"glibc-ld.so.cache1.1";
    const HEADER: usize = 48;
    const ENTRY: usize = 24;
    let Ok(data) = std::fs::read(path) else { return Vec::new() };
    let Some(start) = data.windows(MAGIC.len()).position(|w| w == MAGIC) else { return Vec::new() };
    let new = &data[start..];
    let u32_at = |at: usize| new.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let Some(count) = u32_at(20) else { return Vec::new() };
    let string = |at: usize| -> Option<String> {
        let rest = new.get(at..)?;
        let end = rest.iter().position(|b| *b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    };
    (0..count.min(100_000))
        .filter_map(|i| {
            let at = HEADER + i * ENTRY;
            Some((string(u32_at(at + 4)?)?, string(u32_at(at + 8)?)?))
        })
        .collect()
}

/// `$ORIGIN` (and `${ORIGIN}`) of a run path, for an object in `dir`.
fn expand(entry: &str, dir: &Path) -> String {
    let origin = dir.display().to_string();
    entry.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)
}

/// The loader and libraries `program` needs, by the paths the loader opens; `None` if it
/// is not a dynamic ELF program (a script, a static binary, not a file).
pub fn deps(program: &Path, cache_path: &Path) -> Option<ElfDeps> {
    let top = read_object(program)?;
    let interpreter = top.interpreter.clone()?;
    // The loader is an ELF file of the program's machine at an absolute path, or nothing is
    // brought for the program (a crafted PT_INTERP could name any file of the host).
    let loader = Path::new(&interpreter);
    if !loader.is_absolute() || read_object(loader).is_none_or(|o| o.machine != top.machine) {
        return Some(ElfDeps {
            missing: vec![format!("loader {interpreter} (not an ELF file of this machine)")],
            ..ElfDeps::default()
        });
    }
    let cache = std::cell::OnceCell::new();
    let cache = || cache.get_or_init(|| read_cache(cache_path)).as_slice();
    let machine = top.machine;
    let mut out = ElfDeps { interpreter: PathBuf::from(&interpreter), ..ElfDeps::default() };
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut queue: VecDeque<(PathBuf, Object)> = VecDeque::from([(program.to_path_buf(), top)]);
    let mut looked = 0;
    let probes = std::cell::Cell::new(0usize);
    while let Some((path, obj)) = queue.pop_front() {
        looked += 1;
        if looked > MAX_OBJECTS {
            out.missing.push(format!("(stopped after {MAX_OBJECTS} objects)"));
            break;
        }
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        for name in &obj.needed {
            if !seen.insert(name.clone()) {
                continue;
            }
            let found = find(name, &obj, &dir, &cache, machine, &probes);
            match found {
                Some((lib, o)) => {
                    out.libraries.push((name.clone(), lib.clone()));
                    queue.push_back((lib, o));
                }
                None => out.missing.push(name.clone()),
            }
        }
    }
    Some(out)
}

/// Where the loader would find `name` for `obj` (in `dir`): a file of the program's machine.
fn find<'c>(
    name: &str,
    obj: &Object,
    dir: &Path,
    cache: &dyn Fn() -> &'c [(String, String)],
    machine: u16,
    probes: &std::cell::Cell<usize>,
) -> Option<(PathBuf, Object)> {
    // Only absolute paths: a relative one would be agentd's working directory, not the tool's.
    let fits = |p: PathBuf| {
        probes.set(probes.get() + 1);
        if !p.is_absolute() || probes.get() > MAX_PROBES {
            return None;
        }
        read_object(&p).filter(|o| o.machine == machine).map(|o| (p, o))
    };
    if name.contains('/') {
        return fits(PathBuf::from(expand(name, dir)));
    }
    let rpath = if obj.runpath.is_empty() { obj.rpath.as_slice() } else { &[] };
    for d in rpath.iter().chain(&obj.runpath) {
        if let Some(hit) = fits(Path::new(&expand(d, dir)).join(name)) {
            return Some(hit);
        }
    }
    // The cache is read only when a run path did not have the library.
    for (key, value) in cache() {
        if key == name {
            if let Some(hit) = fits(PathBuf::from(value)) {
                return Some(hit);
            }
        }
    }
    DEFAULT_DIRS.iter().find_map(|d| fits(Path::new(d).join(name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_needs_its_loader_and_libc() {
        let sh = Path::new("/bin/sh");
        let Some(d) = deps(sh, Path::new("/etc/ld.so.cache")) else {
            panic!("/bin/sh is not a dynamic ELF program here");
        };
        assert!(d.interpreter.to_string_lossy().contains("ld-linux"), "{d:?}");
        assert!(d.libraries.iter().any(|(n, p)| n == "libc.so.6" && p.exists()), "{d:?}");
        assert!(d.missing.is_empty(), "{d:?}");
        // Python's needs are found transitively (libm, libz, libexpat...).
        if let Some(py) = deps(Path::new("/usr/bin/python3"), Path::new("/etc/ld.so.cache")) {
            assert!(py.libraries.iter().any(|(n, _)| n == "libm.so.6"), "{py:?}");
        }
        // Not programs: a script, a directory, nothing.
        assert!(deps(Path::new("/etc/passwd"), Path::new("/etc/ld.so.cache")).is_none());
        assert!(deps(Path::new("/usr"), Path::new("/etc/ld.so.cache")).is_none());
        assert!(deps(Path::new("/no/such"), Path::new("/etc/ld.so.cache")).is_none());
    }

    #[test]
    fn the_cache_lists_libc() {
        let cache = read_cache(Path::new("/etc/ld.so.cache"));
        assert!(cache.iter().any(|(k, v)| k == "libc.so.6" && v.ends_with("libc.so.6")), "{} entries", cache.len());
    }
}
