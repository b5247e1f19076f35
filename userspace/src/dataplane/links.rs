//! Attaching through XDP links pinned for the next process, and replacing the previous
//! process's program through the links it pinned (see [`crate::handover`]).

use std::path::Path;

use aya::programs::{
    links::{FdLink, PinnedLink},
    xdp::XdpLink,
};

use super::{AttachMode, Dataplane, DataplaneError};
use crate::pins::Pins;

/// How [`Dataplane::attach_pinned`] found an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// Attached now; its link is pinned.
    Attached(AttachMode),
    /// The previous process's program runs there, until [`Dataplane::take_over`] replaces it.
    TakingOver,
}

impl Dataplane {
    /// Attaches to `interface` through a link pinned in `pins`. Where the previous process
    /// left its link, only notes the interface: its program keeps running until this one's
    /// maps are filled and [`Dataplane::take_over`] replaces it.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        pins: &Pins,
    ) -> Result<Attachment, DataplaneError> {
        let ifindex = super::ifindex(interface)?;
        if pins.link(interface).exists() {
            self.attached.insert(ifindex, interface.to_owned());
            self.taking_over.push(interface.to_owned());
            return Ok(Attachment::TakingOver);
        }
        self.attach_and_pin(interface, pins)
            .map(Attachment::Attached)
    }

    /// Whether a previous process's program still runs on some interface.
    pub fn is_taking_over(&self) -> bool {
        !self.taking_over.is_empty()
    }

    /// Replaces the previous process's program with this one on every interface it runs on,
    /// each in one `bpf_link_update`: a packet meets one program or the other, never none. A
    /// link that cannot be updated (its interface was recreated) is replaced by a new one.
    pub fn take_over(&mut self, pins: &Pins) -> Result<(), DataplaneError> {
        for interface in std::mem::take(&mut self.taking_over) {
            let path = pins.link(&interface);
            if let Err(error) = self.update_link(&interface, &path) {
                tracing::warn!(
                    interface,
                    error = format!("{:#}", anyhow::Error::from(error)),
                    "the pinned XDP link could not be taken over: attaching anew"
                );
                let _ = std::fs::remove_file(&path);
                self.attach_and_pin(&interface, pins)?;
            }
        }
        Ok(())
    }

    fn update_link(&mut self, interface: &str, path: &Path) -> Result<(), DataplaneError> {
        let link_error = |action, source| link_error(interface, path, action, source);
        let pinned =
            PinnedLink::from_pin(path).map_err(|error| link_error("opened", error.into()))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|error| link_error("opened", error.into()))?;
        self.program()?
            .attach_to_link(link)
            .map_err(|error| link_error("updated", error.into()))?;
        Ok(())
    }

    fn attach_and_pin(
        &mut self,
        interface: &str,
        pins: &Pins,
    ) -> Result<AttachMode, DataplaneError> {
        let (mode, link_id) = self.attach_link(interface)?;
        let path = pins.link(interface);
        let link_error = |action, source| link_error(interface, &path, action, source);
        let link = self
            .program()?
            .take_link(link_id)
            .map_err(|error| link_error("taken", error.into()))?;
        // The pin holds the link: closing this descriptor leaves the program attached until
        // the pin is removed (a stop) or its program replaced (a successor).
        FdLink::try_from(link)
            .map_err(|error| link_error("pinned", error.into()))?
            .pin(&path)
            .map_err(|error| link_error("pinned", error.into()))?;
        Ok(mode)
    }
}

/// What failed with the pinned link of `interface` at `path`.
fn link_error(
    interface: &str,
    path: &Path,
    action: &'static str,
    source: Box<dyn std::error::Error + Send + Sync>,
) -> DataplaneError {
    DataplaneError::Link {
        interface: interface.to_owned(),
        action,
        path: path.to_owned(),
        source,
    }
}
