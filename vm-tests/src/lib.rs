//! Tests that only a BPF-LSM kernel can run; filled in by the VM-test issue.
