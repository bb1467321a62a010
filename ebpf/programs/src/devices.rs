//! `cgroup/dev`: a call may read and write the device nodes of the sandbox's `/dev` and no
//! others, and may create none. The only device control cgroup v2 has.

use agentd_ebpf_common::{AUDIT_ONLY, EV_DEVICE, MODE_ENFORCE, VERDICT_DENIED};
use aya_ebpf::macros::cgroup_device;
use aya_ebpf::programs::DeviceContext;

use crate::{current_call, reserve_for, submit};

const DEV_CHAR: u32 = 2;
const ACC_MKNOD: u32 = 1;

/// (major, minor) of /dev/null, zero, full, random, urandom and tty.
const ALLOWED: [(u32, u32); 6] = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0)];

#[cgroup_device]
pub fn devices(ctx: DeviceContext) -> i32 {
    // SAFETY: the context pointer is valid for this program run; u32 loads.
    let (access_type, major, minor) = unsafe {
        let d = ctx.device;
        ((*d).access_type, (*d).major, (*d).minor)
    };
    let (ty, access) = (access_type & 0xffff, access_type >> 16);
    let listed = ALLOWED.iter().any(|(ma, mi)| *ma == major && *mi == minor);
    if ty == DEV_CHAR && access & ACC_MKNOD == 0 && listed {
        return 1;
    }
    // Attached to agentd's parent cgroup: every task below it is in a sandbox. The rule is the
    // same for all; only a registered call's refusals can be recorded (and audited instead).
    let Some((cgid, info)) = current_call() else { return 0 };
    let ring = info.ring;
    let enforce = info.mode == MODE_ENFORCE;
    if let Some(mut entry) = reserve_for(cgid, ring, EV_DEVICE, VERDICT_DENIED, false) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = access_type;
            (*ev).target = (major << 20) | (minor & 0xfffff);
            (*ev).info = if enforce { 0 } else { AUDIT_ONLY };
        }
        submit(entry);
    }
    i32::from(!enforce)
}
