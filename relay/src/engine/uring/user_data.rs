//! What a completion is for: [`UserData`] = slot + generation + [`Op`] + direction, packed into
//! the 64 bits io_uring hands back with it.

/// Slot value meaning "no connection" (listener, control, timer, cancel operations).
pub(super) const NO_SLOT: u32 = u32::MAX;

/// What an operation was, decoded from a completion's user data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Op {
    AcceptMulti = 1,
    ControlRead,
    Tick,
    Cancel,
    Connect,
    LinkTimeout,
    PollIn,
    PollOut,
    RecvMulti,
    Send,
    /// Waiting for a client's PROXY header bytes.
    HeaderPoll,
    /// Fast path: the timer before re-checking that a direction's bytes all left.
    Drain,
    /// Fast path, flow control: the timer before re-checking that a direction's redirected
    /// bytes all reached the destination, so held ones may follow.
    Forward,
    /// Fast path, flow control: the verdict's ring of "started holding" events is readable.
    HeldPoll,
    /// An upstream connect the kernel is still completing (CONNECT answered EINPROGRESS):
    /// POLLOUT, linked to the connect timeout, then SO_ERROR says how it ended.
    ConnectPoll,
}

impl Op {
    pub(super) fn from_u8(v: u8) -> Option<Op> {
        use Op::*;
        Some(match v {
            1 => AcceptMulti,
            2 => ControlRead,
            3 => Tick,
            4 => Cancel,
            5 => Connect,
            6 => LinkTimeout,
            7 => PollIn,
            8 => PollOut,
            9 => RecvMulti,
            10 => Send,
            11 => HeaderPoll,
            12 => Drain,
            13 => Forward,
            14 => HeldPoll,
            15 => ConnectPoll,
            _ => return None,
        })
    }
}

/// `slot | generation << 32 | op << 48 | direction << 56`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct UserData {
    pub(super) slot: u32,
    pub(super) generation: u16,
    pub(super) op: Op,
    pub(super) dir: u8,
}

impl UserData {
    pub(super) fn encode(self) -> u64 {
        u64::from(self.slot)
            | u64::from(self.generation) << 32
            | u64::from(self.op as u8) << 48
            | u64::from(self.dir) << 56
    }

    pub(super) fn decode(v: u64) -> Option<UserData> {
        Some(UserData {
            slot: v as u32,
            generation: (v >> 32) as u16,
            op: Op::from_u8((v >> 48) as u8)?,
            dir: (v >> 56) as u8,
        })
    }

    pub(super) fn global(op: Op, index: u32) -> u64 {
        UserData {
            slot: NO_SLOT,
            generation: index as u16,
            op,
            dir: 0,
        }
        .encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let u = UserData {
            slot: 123_456,
            generation: 65_000,
            op: Op::ConnectPoll,
            dir: 1,
        };
        assert_eq!(UserData::decode(u.encode()), Some(u));
        for v in 1..=Op::ConnectPoll as u8 {
            assert_eq!(Op::from_u8(v).map(|o| o as u8), Some(v));
        }
        assert_eq!(Op::from_u8(0), None);
        assert_eq!(Op::from_u8(Op::ConnectPoll as u8 + 1), None);
    }
}
