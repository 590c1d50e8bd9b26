//! The administrative client: asks a daemon for its status, or to stop keeping a
//! persistent space, over its application socket (an `Admin` connection).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use gallocy_core::ipc::{name_field, ErrorCode, IpcMessage, IPC_FRAME_BYTES, IPC_NAME_BYTES};
use gallocy_core::meta::MembershipRejection;

fn roundtrip(stream: &mut UnixStream, message: IpcMessage) -> Result<IpcMessage, String> {
    let mut frame = [0u8; IPC_FRAME_BYTES];
    message.encode(1, &mut frame);
    stream.write_all(&frame).map_err(|e| format!("send: {e}"))?;
    stream
        .read_exact(&mut frame)
        .map_err(|e| format!("receive: {e}"))?;
    match IpcMessage::decode(&frame) {
        Ok((
            _,
            IpcMessage::Error {
                code: ErrorCode::MembershipRejected,
                detail,
            },
        )) => Err(format!(
            "membership change refused: {}",
            MembershipRejection::from_code(detail).map_or("unknown reason", |why| why.describe())
        )),
        Ok((_, IpcMessage::Error { code, detail })) => {
            Err(format!("daemon refused: {} ({detail})", code.describe()))
        }
        Ok((_, reply)) => Ok(reply),
        Err(e) => Err(format!("bad reply: {e:?}")),
    }
}

/// An administrative connection to the daemon at `socket`, said hello on.
pub(crate) fn connect_admin(socket: &Path, timeout: Duration) -> Result<UnixStream, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        format!(
            "no daemon at {}: {e} (is gallocyd running?)",
            socket.display()
        )
    })?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    roundtrip(&mut stream, IpcMessage::admin_hello(std::process::id()))?;
    Ok(stream)
}

/// Stops keeping the space named `name` (created with `GALLOCY_PERSISTENT=1`): it ends
/// when its last process has gone, at once if none is attached. Returns whether it
/// ended at once.
pub fn unpersist(socket: &Path, name: &str) -> Result<bool, String> {
    let Some(field) = name_field(name.as_bytes()) else {
        return Err(format!("a space name has 1 to {IPC_NAME_BYTES} bytes"));
    };
    // One Raft commit: allow for an election.
    let mut stream = connect_admin(socket, Duration::from_secs(30))?;
    match roundtrip(&mut stream, IpcMessage::Unpersist { name: field })? {
        IpcMessage::Unpersisted { destroyed } => Ok(destroyed),
        _ => Err("unexpected reply to unpersist".into()),
    }
}

/// Makes `node` a member of the cluster of the daemon at `socket` (its own daemon was
/// started to join), or removes it for good (`add` false). Returns once the change is
/// applied there.
pub fn change_membership(socket: &Path, node: u64, add: bool) -> Result<(), String> {
    // One Raft commit: allow for an election.
    let mut stream = connect_admin(socket, Duration::from_secs(30))?;
    let request = if add {
        IpcMessage::AddMember { node }
    } else {
        IpcMessage::RemoveMember { node }
    };
    match roundtrip(&mut stream, request)? {
        IpcMessage::MembershipChanged {
            node: changed,
            added,
        } if changed == node && added == add => Ok(()),
        _ => Err("unexpected reply to a membership change".into()),
    }
}

/// The daemon's status document (see `Daemon::status_json`).
pub fn status(socket: &Path) -> Result<serde_json::Value, String> {
    let mut stream = connect_admin(socket, Duration::from_secs(5))?;
    let IpcMessage::StatusReply { len_bytes } = roundtrip(&mut stream, IpcMessage::Status)? else {
        return Err("unexpected reply to a status request".into());
    };
    let mut json = vec![0u8; len_bytes as usize];
    stream
        .read_exact(&mut json)
        .map_err(|e| format!("receive status: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("bad status document: {e}"))
}
