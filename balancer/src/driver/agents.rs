//! The agent listener: backends' agents dial in, authenticate
//! (`encap-proto` SPEC.md §4), and then exchange frames.
//!
//! Per link: the handshake runs under `agents.handshake_timeout_ms`; on
//! `Verified` the agent gets its backend id (`[agents.ids]`, else a stable
//! hash of its name), is refused with `DUPLICATE_AGENT` if a connected agent
//! holds that id or name, else is welcomed and reported to the router with
//! `backend_up` before the WELCOME is written (so a WELCOMEd agent is
//! already routable). Then a reader feeds frames to the router and a writer
//! drains the link's bounded queue. Link closed: `backend_down`.

// Drivers own the clock and the tasks: the one place they are allowed.
#![allow(clippy::disallowed_methods)]

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use bytes::BytesMut;
use encap_proto::frame::auth::{BalancerHandshake, BalancerStep};
use encap_proto::frame::{encode, Close, Code, CodecError, Frame, FrameCodec, Refuse};
use futures::{FutureExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::{bump, write_loop, AgentHandle, ConnState, Shared};
use crate::config::hashed_backend_id;
use crate::core::router::BackendId;

/// Accepts agent links until shutdown.
pub(super) async fn serve_agents(shared: Rc<Shared>, listener: TcpListener) {
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "agent accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shared.shutdown.cancelled() => return,
        };
        let link = shared.next_id();
        let span = tracing::info_span!("agent", link, peer = %remote);
        shared
            .tasks
            .spawn_local(serve_link(shared.clone(), link, stream, remote).instrument(span));
    }
}

/// Why a handshake did not complete.
enum Failed {
    /// The link ended or failed; nothing more to send.
    Closed(String),
    /// Send this frame, then close.
    Refuse(Frame, String),
}

async fn serve_link(shared: Rc<Shared>, link: u64, stream: TcpStream, remote: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut reader = FramedRead::new(rd, FrameCodec::new(shared.settings.max_frame_body));
    let s = &shared.settings;
    let mut handshake = BalancerHandshake::new(&s.secret.borrow(), &s.agent_name, rand::random());
    let outcome = tokio::select! {
        r = tokio::time::timeout(s.handshake_timeout, shake(&mut reader, &mut wr, &mut handshake)) => match r {
            Ok(outcome) => outcome,
            Err(_) => Err(Failed::Refuse(
                Frame::Refuse(Refuse { code: Code::TIMEOUT, reason: "handshake not finished in time".to_owned() }),
                "handshake timed out".to_owned(),
            )),
        },
        () = shared.shutdown.cancelled() => Err(Failed::Refuse(
            Frame::Refuse(Refuse { code: Code::SHUTTING_DOWN, reason: "balancer shutting down".to_owned() }),
            "shutting down".to_owned(),
        )),
    };
    let (name, version) = match outcome {
        Ok(verified) => verified,
        Err(Failed::Closed(why)) => {
            debug!(why, "agent link closed during the handshake");
            return;
        }
        Err(Failed::Refuse(frame, why)) => {
            bump(&shared.counters.agents_refused);
            warn!(peer = %remote, why, "agent refused");
            write_frame(&mut wr, &frame, reader.decoder().version()).await;
            let _ = wr.shutdown().await;
            return;
        }
    };

    let id = shared
        .settings
        .agent_ids
        .get(&name)
        .copied()
        .unwrap_or_else(|| hashed_backend_id(&name));
    let clash = shared
        .agents
        .borrow()
        .iter()
        .find(|(&other_id, a)| other_id == id || a.name == name)
        .map(|(&other_id, a)| (other_id, a.name.clone()));
    if let Some((other_id, other)) = clash {
        bump(&shared.counters.agents_refused);
        let reason = if other == name {
            format!("an agent named {name:?} is already connected")
        } else {
            format!(
                "backend id {other_id} of {name:?} is held by connected agent {other:?}; give one of them an id in [agents.ids]"
            )
        };
        warn!(peer = %remote, agent = %name, %reason, "agent refused");
        let refuse = Frame::Refuse(Refuse {
            code: Code::DUPLICATE_AGENT,
            reason,
        });
        write_frame(&mut wr, &refuse, version).await;
        let _ = wr.shutdown().await;
        return;
    }
    let Some(welcome) =
        handshake.welcome(id, s.report_interval_ms, s.max_frame_body, s.public.clone())
    else {
        // `welcome` is `None` only before verification, which `shake` returned.
        warn!("handshake state lost after verification; closing");
        return;
    };

    // Routable before the WELCOME is out: frames the router sends
    // meanwhile wait in the queue and are written after it.
    let (tx, rx) = super::queue::queue(s.agent_queue);
    shared.agents.borrow_mut().insert(
        id,
        AgentHandle {
            link,
            name: name.clone(),
            version,
            tx,
        },
    );
    let now = Instant::now();
    shared.feed(|r| r.backend_up(now, id, &name));
    info!(peer = %remote, agent = %name, backend = id, version, "agent welcomed");
    let state = Rc::new(ConnState {
        cancel: CancellationToken::new(),
        last_write: Cell::new(now),
    });
    if write_frame(&mut wr, &welcome, version).await {
        shared.tasks.spawn_local(
            write_loop(Rc::new(wr), rx, state.clone()).instrument(tracing::Span::current()),
        );
        let why = read_frames(&shared, id, &mut reader, &state).await;
        info!(agent = %name, backend = id, why, "agent link closed");
    }

    // Only this link's handle: a reconnect may already hold the id.
    let mine = shared
        .agents
        .borrow()
        .get(&id)
        .is_some_and(|a| a.link == link);
    if mine {
        shared.agents.borrow_mut().remove(&id);
        shared.feed(|r| r.backend_down(id, "agent link closed"));
    }
}

/// Runs the handshake to `Verified`: the agent's name and the version.
async fn shake(
    reader: &mut FramedRead<OwnedReadHalf, FrameCodec>,
    wr: &mut OwnedWriteHalf,
    handshake: &mut BalancerHandshake,
) -> Result<(String, u8), Failed> {
    loop {
        let frame = match reader.next().await {
            None => return Err(Failed::Closed("closed by the agent".to_owned())),
            Some(Err(CodecError::Io(e))) => return Err(Failed::Closed(e.to_string())),
            Some(Err(CodecError::Frame(e))) => {
                return Err(Failed::Refuse(e.to_error_frame(), e.to_string()))
            }
            Some(Ok(frame)) => frame,
        };
        match handshake.handle(frame) {
            Ok(BalancerStep::Send(frame)) => {
                if !write_frame(wr, &frame, reader.decoder().version()).await {
                    return Err(Failed::Closed("write failed".to_owned()));
                }
                // The rest of the link speaks the version CHALLENGE names.
                if let Frame::Challenge(c) = &frame {
                    reader.decoder_mut().set_version(c.version);
                }
            }
            Ok(BalancerStep::Verified { agent, version }) => return Ok((agent, version)),
            Err(e) => {
                let why = e.to_string();
                return match e.to_frame() {
                    Some(frame) => Err(Failed::Refuse(frame, why)),
                    None => Err(Failed::Closed(why)),
                };
            }
        }
    }
}

/// Writes one frame directly (handshake time, before the writer task runs).
async fn write_frame(wr: &mut OwnedWriteHalf, frame: &Frame, version: u8) -> bool {
    let mut buf = BytesMut::new();
    if let Err(e) = encode(frame, version, &mut buf) {
        warn!(error = %e, "cannot encode a handshake frame");
        return false;
    }
    wr.write_all(&buf).await.is_ok()
}

/// Feeds the link's frames to the router until it ends; returns why.
async fn read_frames(
    shared: &Rc<Shared>,
    id: BackendId,
    reader: &mut FramedRead<OwnedReadHalf, FrameCodec>,
    state: &ConnState,
) -> &'static str {
    let idle = shared.settings.agent_idle;
    // One timer for the link, armed at or before the real deadline: a frame
    // only moves `last`, and a timer that fires early is re-armed, so a
    // frame costs no timer registration.
    let mut last = Instant::now();
    let timer = tokio::time::sleep(idle);
    let closed = state.cancel.cancelled();
    let shutdown = shared.shutdown.cancelled();
    tokio::pin!(timer, closed, shutdown);
    loop {
        let next = tokio::select! {
            // In this order: the link's end and shutdown first, then a
            // frame that is there over a timer firing at the same moment
            // (the link was not silent).
            biased;
            () = &mut closed => return "closed by the balancer",
            () = &mut shutdown => {
                let bye = Frame::Goodbye(Close { code: Code::SHUTTING_DOWN, reason: "balancer shutting down".to_owned() });
                shared.perform(crate::core::router::Action::CloseBackend { backend: id, frame: Some(bye) });
                return "balancer shutting down";
            }
            r = reader.next() => r,
            () = &mut timer => {
                let due = last + idle;
                if Instant::now() < due {
                    timer.as_mut().reset(due.into());
                    continue;
                }
                let err = Frame::Error(Close {
                    code: Code::TIMEOUT,
                    reason: format!("agent link silent for {} s", idle.as_secs()),
                });
                shared.perform(crate::core::router::Action::CloseBackend {
                    backend: id,
                    frame: Some(err),
                });
                return "silent for too long";
            }
        };
        // Frames the same read brought are handled under one cork: what
        // they send to one SIP peer goes out in one write.
        let _cork = shared.cork();
        let mut next = next;
        loop {
            if let Some(why) = take_frame(shared, id, next, &mut last) {
                return why;
            }
            // The next frame if it is already read (no wait under the cork).
            match reader.next().now_or_never() {
                Some(more) => next = more,
                None => break,
            }
        }
    }
}

/// Feeds one read result of the link to the router (`last`: when a frame
/// last came); returns why the link ends, if it does.
fn take_frame(
    shared: &Rc<Shared>,
    id: BackendId,
    next: Option<Result<Frame, CodecError>>,
    last: &mut Instant,
) -> Option<&'static str> {
    match next {
        Some(Ok(frame)) => {
            let now = Instant::now();
            *last = now;
            shared.feed(|r| r.handle_frame(now, id, frame));
            None
        }
        Some(Err(CodecError::Frame(e))) => {
            bump(&shared.counters.agent_frame_errors);
            // SPEC.md §6: say what was wrong, then close.
            warn!(backend = id, error = %e, "malformed frame from agent; closing the link");
            shared.perform(crate::core::router::Action::CloseBackend {
                backend: id,
                frame: Some(e.to_error_frame()),
            });
            Some("malformed frame")
        }
        Some(Err(CodecError::Io(e))) => {
            debug!(error = %e, "agent link read failed");
            Some("read failed")
        }
        None => Some("closed by the agent"),
    }
}
