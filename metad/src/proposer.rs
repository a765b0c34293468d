//! Group commit for client commands: the commands that arrive while earlier
//! ones are being committed go into the log together, as one entry.
//!
//! openraft 0.9 makes each `client_write` an entry of its own, so concurrent
//! writers would each pay a follower fsync and a round trip (and, before the
//! leader's own append was reported early — see `raft_store` — a leader
//! fsync inside openraft's core task too). Here every client
//! command goes through one queue; whenever a commit slot is free, whatever
//! has queued since is proposed as a single `Op::Batch` entry (or, if it is
//! alone, as itself). One writer pays nothing extra — its command is
//! proposed at once — while N concurrent writers share the fsyncs and the
//! round trips of each entry. Each command in a batch keeps its own client
//! id, sequence number and saved reply, so exactly-once holds as before.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::raft_types::{ApplyResult, Command, MetaNode, Op, Raft, Reply};

/// Most commands in one entry: bounds the apply time of one entry.
const MAX_BATCH_COMMANDS: usize = 256;
/// Most encoded bytes in one entry (a command bigger than this goes alone).
const MAX_BATCH_BYTES: u64 = 1 << 20;
/// Entries proposed and not yet committed. Two let a command go at once
/// past one commit in flight (a mount's background ReleaseOrphan must not
/// make the user's next unlink wait a whole commit), and batches still form
/// under load (7.8 commands per entry at 16 clients). One gave somewhat
/// larger batches (1.8 against 1.5 over a 1/4/16-client run) and no clear
/// gain in rate within this machine's noise; see docs/PERFORMANCE.md.
const MAX_IN_FLIGHT: usize = 2;
/// Commands waiting for a slot before new callers wait to enqueue.
const QUEUE: usize = 8192;

/// Why a command was not committed. Cloned to every command of a batch.
#[derive(Debug, Clone)]
pub enum ProposeError {
    /// This node is not the leader; the leader if known.
    NotLeader(Option<MetaNode>),
    /// Raft refused the entry for a reason that is a bug on our side.
    Refused(String),
    /// Raft has stopped on this node.
    Stopped(String),
}

struct Pending {
    cmd: Command,
    bytes: u64,
    reply: oneshot::Sender<Result<ApplyResult, ProposeError>>,
}

/// The queue in front of `Raft::client_write`. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
}

impl Proposer {
    /// Starts the batching task on the current runtime.
    pub fn start(raft: Raft) -> Proposer {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx));
        Proposer { tx }
    }

    /// Commits `cmd` (possibly together with others) and returns what
    /// applying it produced.
    pub async fn propose(&self, cmd: Command) -> Result<ApplyResult, ProposeError> {
        let bytes = bincode::serialized_size(&cmd).unwrap_or(MAX_BATCH_BYTES);
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { cmd, bytes, reply })
            .await
            .map_err(|_| ProposeError::Stopped("the proposal queue is closed".into()))?;
        rx.await
            .map_err(|_| ProposeError::Stopped("the proposal was dropped (metad is shutting down)".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<Pending> = None;
    loop {
        // Waiting for a slot first is what makes batches: whatever arrives
        // meanwhile queues up and goes in the next entry.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS {
            match rx.try_recv() {
                Ok(p) if bytes + p.bytes > MAX_BATCH_BYTES => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.bytes;
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        metrics::histogram!("jfs_raft_proposal_batch_commands").record(batch.len() as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            commit(&raft, batch).await;
            drop(permit);
        });
    }
}

fn propose_error(e: RaftError<u64, ClientWriteError<u64, MetaNode>>) -> ProposeError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader(f.leader_node),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => ProposeError::Refused(e.to_string()),
        RaftError::Fatal(f) => ProposeError::Stopped(f.to_string()),
    }
}

async fn commit(raft: &Raft, mut batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(p) = batch.pop() else { return };
        let res = raft.client_write(p.cmd).await.map(|r| r.data).map_err(propose_error);
        let _ = p.reply.send(res);
        return;
    }
    let (cmds, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
    let now_ns = cmds.iter().map(|c| c.now_ns).max().unwrap_or(0);
    let n = cmds.len();
    let wrapper = Command {
        client_id: 0,
        seq: 0,
        acked_below: 0,
        now_ns,
        session_ns: 0,
        op: Op::Batch { cmds },
    };
    let results: Vec<Result<ApplyResult, ProposeError>> = match raft.client_write(wrapper).await {
        Ok(r) => match r.data {
            Ok(Reply::Batch(each)) if each.len() == n => each.into_iter().map(Ok).collect(),
            other => {
                let e = ProposeError::Refused(format!("a batch of {n} commands was answered with {other:?}"));
                vec![Err(e); n]
            }
        },
        Err(e) => vec![Err(propose_error(e)); n],
    };
    for (reply, res) in replies.into_iter().zip(results) {
        let _ = reply.send(res);
    }
}
