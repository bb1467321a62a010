//! Struct member offsets from the running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The LSM programs are Rust, and Rust BPF programs get no CO-RE relocations, so the
//! supervisor reads the few offsets they need here and hands them over as read-only data.
//! Written by hand, not taken from a crate: aya-obj parses BTF but keeps its type accessors
//! private, and the one standalone BTF crate (btf-rs) is LGPL. Only what finding a member
//! needs is decoded; the format is the kernel's `Documentation/bpf/btf.rst`.

use std::collections::HashMap;

use agentd_ebpf_common::KernelOffsets;

const MAGIC: u16 = 0xeb9f;

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// Why the offsets could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The data is not BTF, or is cut short.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A structure or member the programs need is not in this kernel.
    #[error("the kernel's BTF has no {0}")]
    Missing(String),
}

#[derive(Debug, Clone)]
struct Member {
    name: u32,
    ty: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
struct Type {
    kind: u32,
    /// Referenced type, for modifiers and typedefs.
    ty: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: just types, members and names.
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; id 0 is `void`.
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or(BtfError::Malformed("truncated"))
}

impl Btf {
    /// Parses little-endian BTF.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if b.len() < 24 || u16::from_le_bytes([b[0], b[1]]) != MAGIC {
            return Err(BtfError::Malformed("bad magic (not little-endian BTF)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(BtfError::Malformed("offset overflow"))?;
            b.get(start..start.saturating_add(len)).ok_or(BtfError::Malformed("section out of bounds"))
        };
        let types_raw = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();
        let mut btf = Btf { strings, types: vec![Type { kind: 0, ty: 0, members: vec![] }], structs: HashMap::new() };
        let mut at = 0;
        while at < types_raw.len() {
            let (name, info, size_or_type) =
                (u32_at(types_raw, at)?, u32_at(types_raw, at + 4)?, u32_at(types_raw, at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4, // int, var, decl_tag
                3 => 12,          // array
                KIND_STRUCT | KIND_UNION => {
                    for m in 0..vlen {
                        let base = at + m * 12;
                        let off = u32_at(types_raw, base + 8)?;
                        members.push(Member {
                            name: u32_at(types_raw, base)?,
                            ty: u32_at(types_raw, base + 4)?,
                            bit_offset: if kflag { off & 0x00ff_ffff } else { off },
                        });
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,   // enum, func_proto
                15 | 19 => vlen * 12, // datasec, enum64
                2 | 7..=12 | 16 | 18 => 0,
                _ => return Err(BtfError::Malformed("unknown type kind")),
            };
            at += extra;
            let id = btf.types.len() as u32;
            if kind == KIND_STRUCT && vlen > 0 {
                let n = btf.name(name).to_string();
                btf.structs.entry(n).or_insert(id);
            }
            btf.types.push(Type { kind, ty: size_or_type, members });
        }
        Ok(btf)
    }

    fn name(&self, off: u32) -> &str {
        let tail = self.strings.get(off as usize..).unwrap_or_default();
        let end = tail.iter().position(|c| *c == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end]).unwrap_or("")
    }

    /// Follows typedefs and modifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => id = t.ty,
                _ => return Some(t),
            }
        }
        None
    }

    /// Bit offset of `member` in `t`, looking into anonymous structs and unions.
    fn member_bits(&self, t: &Type, member: &str, depth: u32) -> Option<u32> {
        for m in &t.members {
            if m.name != 0 && self.name(m.name) == member {
                return Some(m.bit_offset);
            }
        }
        if depth > 4 {
            return None;
        }
        for m in t.members.iter().filter(|m| m.name == 0) {
            let inner = self.resolve(m.ty)?;
            if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                if let Some(bits) = self.member_bits(inner, member, depth + 1) {
                    return Some(m.bit_offset + bits);
                }
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`.
    pub fn offset(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        let id = *self.structs.get(name).ok_or_else(|| BtfError::Missing(format!("struct {name}")))?;
        let t = &self.types[id as usize];
        let bits = self
            .member_bits(t, member, 0)
            .ok_or_else(|| BtfError::Missing(format!("member {member} of struct {name}")))?;
        if bits % 8 != 0 {
            return Err(BtfError::Missing(format!("byte-aligned member {member} of struct {name}")));
        }
        Ok(bits / 8)
    }

    /// The offsets the fallback's path walk needs, in [`KernelOffsets`]' order from `task_fs`
    /// to `mount_mountpoint`, and `dentry.d_name.name`. The programs read a `struct path` as
    /// its mount at 0 and its dentry at 8, so a kernel laid out otherwise has no walk.
    fn walk_offsets(&self) -> Result<([u32; 12], u32), BtfError> {
        if (self.offset("path", "mnt")?, self.offset("path", "dentry")?) != (0, 8) {
            return Err(BtfError::Missing("struct path as { mnt, dentry }".into()));
        }
        Ok((
            [
                self.offset("task_struct", "fs")?,
                self.offset("fs_struct", "root")?,
                self.offset("fs_struct", "pwd")?,
                self.offset("task_struct", "files")?,
                self.offset("files_struct", "fdt")?,
                self.offset("fdtable", "fd")?,
                self.offset("fdtable", "max_fds")?,
                self.offset("dentry", "d_parent")?,
                self.offset("vfsmount", "mnt_root")?,
                self.offset("mount", "mnt")?,
                self.offset("mount", "mnt_parent")?,
                self.offset("mount", "mnt_mountpoint")?,
            ],
            self.offset("dentry", "d_name")? + self.offset("qstr", "name")?,
        ))
    }

    /// Every offset the programs need. The Unix-socket ones are optional (before 5.15,
    /// `sock_cgroup_data` has no `cgroup`): without them, all are zero and the Unix hooks let
    /// every connect through to the other layers. The walk's are optional too: without them
    /// the fallback records the tool's strings only.
    pub fn kernel_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let unix = || -> Result<[u32; 8], BtfError> {
            Ok([
                self.offset("unix_sock", "path")? + self.offset("path", "dentry")?,
                self.offset("dentry", "d_inode")?,
                self.offset("dentry", "d_name")? + self.offset("qstr", "name")?,
                self.offset("inode", "i_ino")?,
                self.offset("inode", "i_sb")?,
                self.offset("super_block", "s_dev")?,
                self.offset("sock", "sk_cgrp_data")? + self.offset("sock_cgroup_data", "cgroup")?,
                self.offset("socket", "sk")?,
            ])
        };
        let u = unix().unwrap_or([0; 8]);
        let walk = self.walk_offsets();
        if let Err(e) = &walk {
            tracing::warn!(error = %e, "the fallback layer will name files by the tools' strings only");
        }
        // Counting repeated opens also needs to tell threads and program images apart.
        let task_ids = (|| {
            Ok::<_, BtfError>((self.offset("task_struct", "self_exec_id")?, self.offset("task_struct", "start_time")?))
        })();
        let (w, dentry_name, walk) = match walk {
            Ok((w, name)) => (w, name, 1),
            Err(_) => ([0; 12], u[2], 0),
        };
        Ok(KernelOffsets {
            file_f_path: self.offset("file", "f_path")?,
            file_f_flags: self.offset("file", "f_flags")?,
            bprm_file: self.offset("linux_binprm", "file")?,
            socket_type: self.offset("socket", "type")?,
            task_tgid: self.offset("task_struct", "tgid")?,
            task_cgroups: self.offset("task_struct", "cgroups")?,
            css_set_dfl_cgrp: self.offset("css_set", "dfl_cgrp")?,
            cgroup_kn: self.offset("cgroup", "kn")?,
            kernfs_node_id: self.offset("kernfs_node", "id")?,
            unix_sock_path_dentry: u[0],
            dentry_inode: u[1],
            dentry_name,
            inode_ino: u[3],
            inode_sb: u[4],
            sb_dev: u[5],
            sock_cgroup: u[6],
            socket_sk: u[7],
            walk,
            task_fs: w[0],
            fs_root: w[1],
            fs_pwd: w[2],
            task_files: w[3],
            files_fdt: w[4],
            fdt_fd: w[5],
            fdt_max_fds: w[6],
            dentry_parent: w[7],
            vfsmount_root: w[8],
            mount_mnt: w[9],
            mount_parent: w[10],
            mount_mountpoint: w[11],
            vma_file: self.offset("vm_area_struct", "vm_file").unwrap_or(0),
            vma_flags: self.offset("vm_area_struct", "vm_flags").unwrap_or(0),
            // qstr begins with its hash_len; counting repeats needs the walk and the inode's
            // offsets too.
            dentry_hash_len: match (walk, u[1], u[3], self.offset("qstr", "name"), &task_ids) {
                (1, i, n, Ok(8), Ok(_)) if i != 0 && n != 0 => self.offset("dentry", "d_name").unwrap_or(0),
                _ => 0,
            },
            task_exec_id: task_ids.as_ref().map_or(0, |t| t.0),
            task_start_time: task_ids.as_ref().map_or(0, |t| t.1),
            _pad: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF: `struct outer { int a; union { int b; struct inner c; }; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0inner\0c\0x\0".to_vec();
        let s = |name: &str| {
            let pat = format!("\0{name}\0");
            strings.windows(pat.len()).position(|w| w == pat.as_bytes()).map(|p| p as u32 + 1).expect("name in table")
        };
        let mut t = Vec::new();
        let mut push = |words: &[u32]| words.iter().for_each(|w| t.extend_from_slice(&w.to_le_bytes()));
        push(&[s("int"), 1 << 24, 4, 32]); // 1: int
        push(&[s("inner"), (KIND_STRUCT << 24) | 1, 8, s("x"), 1, 32]); // 2: struct inner { _; int x @4 }
        push(&[0, (KIND_UNION << 24) | 2, 8, s("b"), 1, 0, s("c"), 2, 0]); // 3: anonymous union
        push(&[s("outer"), (KIND_STRUCT << 24) | 2, 16, s("a"), 1, 0, 0, 3, 64]); // 4: struct outer
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_members_directly_and_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).expect("sample parses");
        assert_eq!(btf.offset("outer", "a").expect("member"), 0);
        assert_eq!(btf.offset("outer", "b").expect("member"), 8);
        assert_eq!(btf.offset("outer", "c").expect("member"), 8);
        assert_eq!(btf.offset("inner", "x").expect("member"), 4);
        assert!(matches!(btf.offset("outer", "nope"), Err(BtfError::Missing(_))));
        assert!(matches!(btf.offset("nope", "a"), Err(BtfError::Missing(_))));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(Btf::parse(b"not btf at all, not btf at all").is_err());
        let mut b = sample();
        b.truncate(40);
        assert!(Btf::parse(&b).is_err());
    }

    #[test]
    fn reads_this_kernel_when_it_has_btf() {
        let Ok(raw) = std::fs::read("/sys/kernel/btf/vmlinux") else { return };
        let offsets = Btf::parse(&raw).expect("kernel BTF").kernel_offsets().expect("offsets");
        assert!(offsets.file_f_path > 0 && offsets.task_cgroups > 0, "{offsets:?}");
    }
}
