//! Storage tiers of a cached block: reuse from GPU is free, from host or disk costs a copy.

use crate::error::{Error, Result};

/// Ordered fastest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub enum Tier {
    #[default]
    Gpu = 0,
    Host = 1,
    Disk = 2,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Gpu, Tier::Host, Tier::Disk];

    pub fn parse(name: &str) -> Result<Tier> {
        match name.to_ascii_lowercase().as_str() {
            "gpu" | "device" | "hbm" => Ok(Tier::Gpu),
            "host" | "cpu" | "dram" => Ok(Tier::Host),
            "disk" | "ssd" | "nvme" => Ok(Tier::Disk),
            other => Err(Error::invalid(format!(
                "unknown storage tier {other:?} (expected gpu, host or disk)"
            ))),
        }
    }

    pub fn from_index(i: u64) -> Result<Tier> {
        match i {
            0 => Ok(Tier::Gpu),
            1 => Ok(Tier::Host),
            2 => Ok(Tier::Disk),
            other => Err(Error::invalid(format!(
                "unknown storage tier index {other} (expected 0, 1 or 2)"
            ))),
        }
    }

    #[inline]
    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn name(self) -> &'static str {
        match self {
            Tier::Gpu => "gpu",
            Tier::Host => "host",
            Tier::Disk => "disk",
        }
    }

    /// Best (fastest) tier present in a mask, if any.
    #[inline]
    pub fn best(mask: u8) -> Option<Tier> {
        if mask & 1 != 0 {
            Some(Tier::Gpu)
        } else if mask & 2 != 0 {
            Some(Tier::Host)
        } else if mask & 4 != 0 {
            Some(Tier::Disk)
        } else {
            None
        }
    }
}
