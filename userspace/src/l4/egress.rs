//! Which interfaces can take frames the XDP program redirects to them: the kernel's XDP
//! feature flags of each, read over the `netdev` generic-netlink family.
//!
//! A frame redirected (`bpf_redirect_map`) to an interface whose driver cannot transmit XDP
//! frames (`ndo_xdp_xmit`) is dropped by the kernel after the program has returned, where
//! nothing counts it as the program's. A veth can transmit them only while its peer runs an
//! XDP program or has GRO on, so the flag changes at run time and is read again on every poll.
//! Only interfaces that have it go into the program's `EGRESS` device map; a redirect to any
//! other is refused in the program and counted (`l4_drop_redirect`).
//!
//! The family is small and fixed (`include/uapi/linux/netdev.h`), so its one request and the
//! one attribute read from the answer are written here on top of `netlink-packet-generic`,
//! which has no `netdev` family of its own; two blocking round trips on a `netlink-sys` socket
//! (the family's id, then the device) need no connection task.

use std::{collections::BTreeMap, net::IpAddr};

use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NetlinkDeserializable, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlasIterator, ParseableParametrized, NLM_F_REQUEST,
};
use netlink_packet_generic::{
    ctrl::{nlas::GenlCtrlAttrs, GenlCtrl, GenlCtrlCmd},
    GenlFamily, GenlHeader, GenlMessage,
};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};

use super::neighbours::Resolution;

/// `NETDEV_CMD_DEV_GET`.
const NETDEV_CMD_DEV_GET: u8 = 1;
/// `NETDEV_A_DEV_IFINDEX` (u32).
const NETDEV_A_DEV_IFINDEX: u16 = 1;
/// `NETDEV_A_DEV_XDP_FEATURES` (u64, `enum netdev_xdp_act`).
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the driver transmits frames redirected to it.
const NETDEV_XDP_ACT_NDO_XMIT: u64 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("generic netlink: {what} failed")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("generic netlink: {what}: {reason}")]
    Answer { what: String, reason: String },
}

/// A `netdev` family message: the request carries the interface index, the answer the
/// device's attributes, of which only the XDP features are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NetdevDevice {
    ifindex: u32,
    xdp_features: Option<u64>,
}

impl GenlFamily for NetdevDevice {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        NETDEV_CMD_DEV_GET
    }

    fn version(&self) -> u8 {
        1
    }
}

impl NetdevDevice {
    fn ifindex_attribute(&self) -> DefaultNla {
        DefaultNla::new(NETDEV_A_DEV_IFINDEX, self.ifindex.to_ne_bytes().to_vec())
    }
}

impl Emitable for NetdevDevice {
    fn buffer_len(&self) -> usize {
        self.ifindex_attribute().buffer_len()
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.ifindex_attribute().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevDevice {
    fn parse_with_param(buf: &[u8], _header: GenlHeader) -> Result<Self, DecodeError> {
        let mut device = NetdevDevice {
            ifindex: 0,
            xdp_features: None,
        };
        for nla in NlasIterator::new(buf) {
            let nla = nla?;
            let value = nla.value();
            match nla.kind() {
                NETDEV_A_DEV_IFINDEX => {
                    let bytes = value
                        .try_into()
                        .map_err(|_| "netdev ifindex is not a u32")?;
                    device.ifindex = u32::from_ne_bytes(bytes);
                }
                NETDEV_A_DEV_XDP_FEATURES => {
                    let bytes = value
                        .try_into()
                        .map_err(|_| "netdev xdp-features is not a u64")?;
                    device.xdp_features = Some(u64::from_ne_bytes(bytes));
                }
                _ => {}
            }
        }
        Ok(device)
    }
}

/// A generic-netlink socket in the daemon's network namespace, with the `netdev` family's id.
pub struct EgressChecker {
    socket: Socket,
    netdev_family: u16,
}

impl EgressChecker {
    pub fn connect() -> Result<EgressChecker, EgressError> {
        let io = |what| move |source| EgressError::Io { what, source };
        let mut socket = Socket::new(NETLINK_GENERIC).map_err(io("socket"))?;
        socket.bind_auto().map_err(io("bind"))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(io("connect"))?;
        let mut checker = EgressChecker {
            socket,
            netdev_family: 0,
        };
        let family = checker.request(GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(
                NetdevDevice::family_name().to_owned(),
            )],
        }))?;
        checker.netdev_family = family
            .nlas
            .iter()
            .find_map(|nla| match nla {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })
            .ok_or_else(|| EgressError::Answer {
                what: "family netdev".to_owned(),
                reason: "no family id in the answer (kernel older than 6.3?)".to_owned(),
            })?;
        Ok(checker)
    }

    /// Can interface `ifindex` transmit frames redirected to it from XDP right now?
    pub fn takes_xdp_frames(&mut self, ifindex: u32) -> Result<bool, EgressError> {
        let mut request = GenlMessage::from_payload(NetdevDevice {
            ifindex,
            xdp_features: None,
        });
        request.set_resolved_family_id(self.netdev_family);
        let device = self.request(request)?;
        Ok(device
            .xdp_features
            .is_some_and(|features| features & NETDEV_XDP_ACT_NDO_XMIT != 0))
    }

    /// Sends one request and reads its one answer.
    fn request<F>(&mut self, payload: GenlMessage<F>) -> Result<F, EgressError>
    where
        F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
        GenlMessage<F>: NetlinkSerializable + NetlinkDeserializable,
    {
        let what = format!("{} request", F::family_name());
        let mut message = NetlinkMessage::from(payload);
        message.header.flags = NLM_F_REQUEST;
        message.finalize();
        let mut buffer = vec![0; message.buffer_len()];
        message.serialize(&mut buffer);
        self.socket
            .send(&buffer, 0)
            .map_err(|source| EgressError::Io {
                what: "send",
                source,
            })?;
        let (answer, _) = self
            .socket
            .recv_from_full()
            .map_err(|source| EgressError::Io {
                what: "receive",
                source,
            })?;
        let answer = NetlinkMessage::<GenlMessage<F>>::deserialize(&answer).map_err(|error| {
            EgressError::Answer {
                what: what.clone(),
                reason: error.to_string(),
            }
        })?;
        match answer.payload {
            NetlinkPayload::InnerMessage(message) => Ok(message.payload),
            NetlinkPayload::Error(error) => Err(EgressError::Answer {
                what,
                reason: error.to_string(),
            }),
            other => Err(EgressError::Answer {
                what,
                reason: format!("unexpected answer {other:?}"),
            }),
        }
    }
}

/// Leaves out backends whose route leaves by an interface the program is not attached to:
/// their replies would come in where nothing translates them back. `interface_name` names an
/// interface by ifindex for the reason shown.
pub fn require_attached_egress(
    resolutions: &mut BTreeMap<IpAddr, Resolution>,
    attached: &BTreeMap<u32, String>,
    interface_name: impl Fn(u32) -> String,
) {
    for resolution in resolutions.values_mut() {
        let Resolution::Ready { next_hop, .. } = resolution else {
            continue;
        };
        if !attached.contains_key(&next_hop.ifindex) {
            let name = interface_name(next_hop.ifindex);
            *resolution = Resolution::Unreachable(format!(
                "its route leaves by {name}, which xlb is not attached to: its replies would \
                 reach the kernel untranslated (add --interface {name})"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use xlb_common::NextHop;

    use super::*;

    #[test]
    fn a_backend_behind_an_interface_without_the_program_is_left_out_with_the_fix() {
        let ready = |ifindex| Resolution::Ready {
            snat_addr: Ipv4Addr::new(10, 0, 0, 1).into(),
            next_hop: NextHop {
                ifindex,
                ..NextHop::default()
            },
        };
        let attached_here = IpAddr::from(Ipv4Addr::new(10, 0, 0, 2));
        let elsewhere = IpAddr::from(Ipv4Addr::new(10, 0, 1, 2));
        let pending = IpAddr::from(Ipv4Addr::new(10, 0, 0, 3));
        let mut resolutions = BTreeMap::from([
            (attached_here, ready(2)),
            (elsewhere, ready(3)),
            (pending, Resolution::Pending),
        ]);
        let attached = BTreeMap::from([(2, "eth0".to_owned())]);
        require_attached_egress(&mut resolutions, &attached, |_| "eth1".to_owned());
        assert_eq!(resolutions[&attached_here], ready(2));
        assert_eq!(resolutions[&pending], Resolution::Pending);
        let Resolution::Unreachable(reason) = &resolutions[&elsewhere] else {
            panic!("{:?}", resolutions[&elsewhere]);
        };
        assert!(reason.contains("add --interface eth1"), "{reason}");
    }
}
