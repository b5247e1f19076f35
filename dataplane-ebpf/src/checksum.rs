//! Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
//!
//! One's-complement sums do not depend on byte order, so every value here is the header's bytes
//! read as a native integer, exactly as the parse and the maps hold them.

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `check` after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// `check` after a 32-bit field (an IPv4 address) changed from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

/// An incremental update of several fields at once: RFC 1624's `~HC + Σ~m + Σm'` summed in
/// one register and folded once at the end. Field by field through [`replace16`] and
/// [`replace32`], the many live temporaries of an IPv6 header's eight address words spill
/// onto the program's 512-byte stack.
#[derive(Clone, Copy)]
pub struct Update(u64);

impl Update {
    #[inline(always)]
    pub fn new(check: u16) -> Update {
        Update(u64::from(!check))
    }

    #[inline(always)]
    pub fn replace16(self, old: u16, new: u16) -> Update {
        Update(self.0 + u64::from(!old) + u64::from(new))
    }

    #[inline(always)]
    pub fn replace32(self, old: u32, new: u32) -> Update {
        self.replace16(old as u16, new as u16)
            .replace16((old >> 16) as u16, (new >> 16) as u16)
    }

    /// The updated checksum.
    #[inline(always)]
    pub fn finish(self) -> u16 {
        let mut sum = self.0;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        !fold(sum as u32)
    }
}
