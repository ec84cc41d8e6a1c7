//! Byte offsets of kernel struct members, from the kernel's own BTF (/sys/kernel/btf/vmlinux),
//! for the few kernel structures a BPF program reads through a helper (the stack walker asks
//! the kernel whether an address lies in anonymous executable memory: `vm_area_struct`'s
//! flags and file). A small reader of the BTF format: aya's BTF types keep their members
//! private.

/// BTF kinds (`BTF_KIND_*`), only those whose extra data or meaning matters here.
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const TYPEDEF: u32 = 8;
const VOLATILE: u32 = 9;
const CONST: u32 = 10;
const RESTRICT: u32 = 11;
const TYPE_TAG: u32 = 18;

struct Type {
    kind: u32,
    name_off: u32,
    /// For modifiers and typedefs: the type they refer to.
    refers_to: u32,
    /// Struct and union members: (name offset, type, offset in bits).
    members: Vec<(u32, u32, u32)>,
}

/// A parsed BTF blob: its types (index = type id - 1) and its string section.
pub struct Btf<'a> {
    types: Vec<Type>,
    strings: &'a [u8],
}

impl<'a> Btf<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Btf<'a>> {
        let u16_at = |at: usize| Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?));
        let u32_at = |at: usize| Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?));
        if u16_at(0)? != 0xeb9f {
            return None;
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let types_start = hdr_len.checked_add(type_off)?;
        let types_end = types_start.checked_add(type_len)?;
        let strings_start = hdr_len.checked_add(str_off)?;
        let strings = data.get(strings_start..strings_start.checked_add(str_len)?)?;
        let mut types = Vec::new();
        let mut at = types_start;
        while at < types_end {
            let (name_off, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 != 0;
            let mut members = Vec::new();
            let extra = match kind {
                1 | 14 | 17 => 4,       // INT, VAR, DECL_TAG
                3 => 12,                 // ARRAY
                STRUCT | UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let offset = u32_at(m + 8)?;
                        // With kind_flag, the high 8 bits are a bitfield's size.
                        let bits = if kind_flag { offset & 0xff_ffff } else { offset };
                        members.push((u32_at(m)?, u32_at(m + 4)?, bits));
                    }
                    vlen * 12
                }
                6 | 13 => vlen * 8,      // ENUM, FUNC_PROTO
                15 | 19 => vlen * 12,    // DATASEC, ENUM64
                _ => 0,
            };
            at += extra;
            types.push(Type { kind, name_off, refers_to: size_or_type, members });
        }
        Some(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    /// The type `id` refers to through typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.get(id)?;
            if matches!(t.kind, TYPEDEF | VOLATILE | CONST | RESTRICT | TYPE_TAG) {
                id = t.refers_to;
            } else {
                return Some(t);
            }
        }
        None
    }

    /// Byte offset of `member` in struct `name`, looking into anonymous structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u64> {
        let s = self
            .types
            .iter()
            .find(|t| t.kind == STRUCT && self.name(t.name_off) == name.as_bytes())?;
        self.find_member(s, member.as_bytes(), 0, 0).filter(|bits| bits % 8 == 0).map(|bits| bits / 8)
    }

    fn find_member(&self, t: &Type, member: &[u8], base: u64, depth: u32) -> Option<u64> {
        if depth > 8 {
            return None;
        }
        for &(name_off, ty, bits) in &t.members {
            let name = self.name(name_off);
            if name == member {
                return Some(base + bits as u64);
            }
            if name.is_empty()
                && let Some(inner) = self.resolve(ty)
                && matches!(inner.kind, STRUCT | UNION)
                && let Some(found) = self.find_member(inner, member, base + bits as u64, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }
}

/// `vm_area_struct`'s `vm_flags` and `vm_file` offsets in the running kernel, if its BTF says.
pub fn vma_offsets() -> Option<(u64, u64)> {
    let data = std::fs::read("/sys/kernel/btf/vmlinux").ok()?;
    let btf = Btf::parse(&data)?;
    Some((btf.member_offset("vm_area_struct", "vm_flags")?, btf.member_offset("vm_area_struct", "vm_file")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made blob: struct s { int a; union { long b; }; }.
    #[test]
    fn members_are_found_inside_anonymous_unions() {
        let mut strings = b"\0s\0a\0b\0int\0long\0".to_vec();
        strings.push(0);
        let mut types = Vec::new();
        let mut ty = |name: u32, info: u32, x: u32, extra: &[u32]| {
            for v in [name, info, x].iter().chain(extra) {
                types.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(7, 1 << 24, 4, &[32]); // [1] INT 'int'
        ty(11, 1 << 24, 8, &[64]); // [2] INT 'long'
        ty(0, (UNION << 24) | 1, 8, &[5, 2, 0]); // [3] union { long b; }
        ty(1, (STRUCT << 24) | 2, 16, &[3, 1, 0, 0, 3, 64]); // [4] struct s { int a; union }
        let mut blob = Vec::new();
        for v in [0xeb9f_u16.to_le_bytes().to_vec(), vec![1, 0], 24u32.to_le_bytes().to_vec()] {
            blob.extend(v);
        }
        for v in [0u32, types.len() as u32, types.len() as u32, strings.len() as u32] {
            blob.extend(v.to_le_bytes());
        }
        blob.extend(&types);
        blob.extend(&strings);
        let btf = Btf::parse(&blob).expect("parse");
        assert_eq!(btf.member_offset("s", "a"), Some(0));
        assert_eq!(btf.member_offset("s", "b"), Some(8));
        assert_eq!(btf.member_offset("s", "c"), None);
        assert_eq!(btf.member_offset("t", "a"), None);
    }

    /// The running kernel's offsets, against `bpftool btf dump` where bpftool is installed
    /// (`cargo xtask prereqs` installs it).
    #[test]
    fn vma_offsets_agree_with_bpftool() {
        let (flags, file) = vma_offsets().expect("vm_area_struct's vm_flags and vm_file in /sys/kernel/btf/vmlinux");
        let out = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", "/sys/kernel/btf/vmlinux"])
            .output()
            .expect("run bpftool (cargo xtask prereqs installs it)");
        let text = String::from_utf8_lossy(&out.stdout);
        let body: Vec<&str> = text
            .split("\n[")
            .find(|b| b.contains("STRUCT 'vm_area_struct' size="))
            .expect("bpftool shows vm_area_struct")
            .lines()
            .collect();
        let bits = |name: &str| -> u64 {
            body.iter()
                .find(|l| l.trim_start().starts_with(&format!("'{name}'")))
                .and_then(|l| l.rsplit("bits_offset=").next()?.trim().parse().ok())
                .unwrap_or_else(|| panic!("bpftool shows no member {name} of vm_area_struct"))
        };
        assert_eq!(file, bits("vm_file") / 8);
        // vm_flags sits first in an anonymous union (with __vm_flags): the union's offset.
        let anon_at = format!("'(anon)' ");
        assert!(
            body.iter().any(|l| l.trim_start().starts_with(&anon_at) && l.ends_with(&format!("bits_offset={}", flags * 8))),
            "no anonymous member of vm_area_struct at vm_flags' offset {flags}:\n{}",
            body.join("\n")
        );
    }
}
