//! The users stage: changed and new users pushed in batches (updates first, so reaching the
//! user limit only holds back creates); what Wazzup acknowledged goes to the mirror, what it
//! refused to the dead letters.

use std::collections::{HashMap, HashSet};

use futures::StreamExt;
use futures::stream::FuturesUnordered;

use wazzup_api::{Account, ApiError, UserPayload};

use super::account::Job;
use super::batch::{BatchQueue, Next, Refusal, Verdict};
use super::phones::{self, PhoneMoves};
use super::progress::Progress;
use super::report::AccountReport;
use super::{Engine, Stop};
use crate::domain::{CrmText, Entity, Mirror, ValidUser, mask_digits};
use crate::plan::UserPlan;
use crate::state::{self, RemoteRejection, StateError};

/// One push of an account's users: the queue of the round being sent, and what the push came
/// to so far.
struct Push<'m, 'u> {
    queue: BatchQueue<&'m ValidUser>,
    /// (user id, hash) of every user Wazzup acknowledged as the CRM has it.
    acked: Vec<(CrmText, String)>,
    /// (user id, hash) of users acknowledged without their phone, for a moment (a first round).
    interim: Vec<(CrmText, String)>,
    /// True while the first round (users without their phone) is sent.
    first_round: bool,
    /// The users of the account as the CRM has them, by id: a first-round refusal is recorded
    /// as theirs.
    real: HashMap<&'u str, &'u ValidUser>,
    /// Ids refused for good this cycle.
    refused: HashSet<String>,
    /// Users Wazzup holds (as the mirror knew them, and as they landed since): a landing of
    /// one of them is an update.
    known: HashSet<String>,
    /// Creates refused because the account is full: sent again once deletes make room.
    full_refused: Vec<&'u ValidUser>,
    /// Why the records still held were refused.
    held: HashMap<String, RemoteRejection>,
    /// Wazzup's answer (status, code, description) when it refused a user because the
    /// account is full.
    limit: Option<(u16, String, String)>,
}

/// What the users stage came to.
pub(super) struct UsersDone<'u> {
    pub stop: Option<Stop>,
    /// Creates refused because the account is full.
    pub full_refused: Vec<&'u ValidUser>,
}

impl Engine {
    /// Pushes the plan's updates and creates; the mirror learns what landed. Phones that move
    /// between users go in the order [`phones::order`] gives (`leaving`: this cycle's deletes).
    pub(super) async fn users_stage<'u>(
        &self,
        job: &Job<'u>,
        plan: &UserPlan<'u>,
        leaving: &[String],
        mirror: &mut Mirror,
        report: &mut AccountReport,
    ) -> Result<UsersDone<'u>, StateError> {
        let mut due: Vec<&ValidUser> = plan.updates.clone();
        due.extend(plan.creates.iter().copied());
        if due.is_empty() {
            return Ok(UsersDone {
                stop: None,
                full_refused: Vec::new(),
            });
        }
        warn_unreadable_phones(&due);
        let in_mirror: HashSet<&str> = plan.updates.iter().map(|u| u.payload.id.as_str()).collect();
        let leaving: HashSet<&str> = leaving.iter().map(String::as_str).collect();
        let moves = match &job.previous.phones {
            Some(book) => phones::order(due.clone(), book, &leaving),
            None => PhoneMoves {
                main: due.clone(),
                ..Default::default()
            },
        };
        let mut push = Push {
            queue: BatchQueue::new(Vec::new(), self.settings.sync.batch_size),
            acked: Vec::new(),
            interim: Vec::new(),
            first_round: false,
            real: due.iter().map(|u| (u.payload.id.as_str(), *u)).collect(),
            refused: HashSet::new(),
            known: in_mirror.iter().map(|id| id.to_string()).collect(),
            full_refused: Vec::new(),
            held: HashMap::new(),
            limit: None,
        };
        let stop = self
            .push_rounds(job, &moves, &mut push, &in_mirror, report)
            .await?;
        for (uid, hash) in push.interim.iter().chain(&push.acked) {
            mirror.insert(uid.clone(), hash.clone());
        }
        let updated = push
            .acked
            .iter()
            .filter(|(u, _)| in_mirror.contains(u.as_str()))
            .count();
        report.updated += updated;
        report.created += push.acked.len() - updated;
        let acked: HashSet<&str> = push.acked.iter().map(|(u, _)| u.as_str()).collect();
        report.deferred += due
            .iter()
            .map(|u| u.payload.id.as_str())
            .filter(|id| !acked.contains(id) && !push.refused.contains(*id))
            .count();
        Ok(UsersDone {
            stop,
            full_refused: push.full_refused,
        })
    }

    /// The rounds: users without their phone, everyone else, the phones given back. A round
    /// starts once the one before was answered; a user whose first round did not land is not
    /// given its phone.
    async fn push_rounds<'m, 'u: 'm>(
        &self,
        job: &Job<'_>,
        moves: &'m PhoneMoves<'u>,
        push: &mut Push<'m, 'u>,
        in_mirror: &HashSet<&str>,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let released: Vec<&ValidUser> = moves.release.iter().collect();
        push.first_round = true;
        let stop = self
            .push_round(job, released, push, in_mirror, report)
            .await?;
        push.first_round = false;
        if stop.is_some() {
            return Ok(stop);
        }
        let stop = self
            .push_round(job, moves.main.clone(), push, in_mirror, report)
            .await?;
        if stop.is_some() {
            return Ok(stop);
        }
        let landed: HashSet<&str> = push.interim.iter().map(|(u, _)| u.as_str()).collect();
        let restore: Vec<&ValidUser> = moves
            .restore
            .iter()
            .copied()
            .filter(|u| landed.contains(u.payload.id.as_str()))
            .collect();
        self.push_round(job, restore, push, in_mirror, report).await
    }

    /// One round: its users in batches, through [`Self::push_users`].
    async fn push_round<'m, 'u>(
        &self,
        job: &Job<'_>,
        users: Vec<&'m ValidUser>,
        push: &mut Push<'m, 'u>,
        in_mirror: &HashSet<&str>,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        if users.is_empty() {
            return Ok(None);
        }
        push.queue = BatchQueue::new(users, self.settings.sync.batch_size);
        if push.limit.is_some() {
            push.queue.set_full();
        }
        self.push_users(job, push, in_mirror, report).await
    }

    /// Sends the queue's batches, up to `sync.batches_in_flight` at once, until the queue is
    /// empty or something stops the account; what is in flight then is still answered and
    /// recorded. The records still held at the end are refused for good. State writes happen
    /// one at a time, here, so the pending log is written before its request goes out.
    async fn push_users<'m, 'u>(
        &self,
        job: &Job<'_>,
        push: &mut Push<'m, 'u>,
        in_mirror: &HashSet<&str>,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let acct = &job.api;
        let mut progress = Progress::new(acct.account_id, push.queue.len());
        let is_create = |u: &&ValidUser| !in_mirror.contains(u.payload.id.as_str());
        let room = self.settings.sync.batches_in_flight.max(1);
        let mut in_flight = FuturesUnordered::new();
        let mut stop = None;
        loop {
            while stop.is_none() && in_flight.len() < room {
                let Some(Next { send, full }) = push.queue.next(is_create) else {
                    break;
                };
                self.refuse_full(job, &full, push, report).await?;
                if send.is_empty() {
                    continue;
                }
                if self.stopping() {
                    stop = Some(Stop::Shutdown);
                    break;
                }
                let creating: Vec<String> = send
                    .iter()
                    .filter(|u| is_create(u))
                    .map(|u| u.payload.id.to_string())
                    .collect();
                state::mark_pending(&self.state, acct.account_id, &creating).await?;
                in_flight.push(async move {
                    let payloads: Vec<&UserPayload> = send.iter().map(|u| &u.payload).collect();
                    let result = self.client.post_users(acct, &payloads).await;
                    (send, result)
                });
            }
            let Some((batch, result)) = in_flight.next().await else {
                if stop.is_none() && push.queue.second_round() {
                    continue;
                }
                break;
            };
            let answered = self.answered(job, batch, result, push, report).await?;
            stop = stop.or(answered);
            progress.set(push.acked.len());
        }
        let held: Vec<RemoteRejection> = push
            .queue
            .take_held()
            .into_iter()
            .filter_map(|u| push.held.remove(u.payload.id.as_str()))
            .collect();
        self.record_refused(job, held, push, report).await?;
        Ok(stop)
    }

    /// Creates refused unsent because the account is full, with Wazzup's answer.
    async fn refuse_full<'m, 'u>(
        &self,
        job: &Job<'_>,
        full: &[&'m ValidUser],
        push: &mut Push<'m, 'u>,
        report: &mut AccountReport,
    ) -> Result<(), StateError> {
        let Some((status, code, description)) = push.limit.clone() else {
            return Ok(());
        };
        let real: Vec<&'u ValidUser> = full.iter().filter_map(|u| push.real_of(u)).collect();
        push.full_refused.extend(real);
        let refused: Vec<_> = full
            .iter()
            .map(|u| user_rejection(push.real_of(u).unwrap_or(u), status, &code, &description))
            .collect();
        self.record_refused(job, refused, push, report).await
    }

    /// Records one `POST /v2/users` answer: what landed, what was refused, or why to stop.
    async fn answered<'m, 'u>(
        &self,
        job: &Job<'_>,
        batch: Vec<&'m ValidUser>,
        result: Result<Option<u64>, ApiError>,
        push: &mut Push<'m, 'u>,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        match result {
            Ok(processed) => match self.landed(&job.api, &batch, processed).await {
                Ok(landed) => {
                    self.record_landed(job, &landed, push).await?;
                    Ok(None)
                }
                Err(stop) => Ok(Some(stop)),
            },
            Err(ApiError::Unauthorized { status }) => Ok(Some(Stop::Auth(status))),
            Err(ApiError::Transient { reason, .. }) => {
                Ok(Some(Stop::Transient(format!("users not pushed: {reason}"))))
            }
            Err(e) => {
                let refused = push.refuse(batch, &e);
                self.record_refused(job, refused, push, report).await?;
                Ok(None)
            }
        }
    }

    /// The users of a batch that landed: all of them, unless Wazzup processed fewer than sent;
    /// then the account's users are read back to see which.
    async fn landed<'u>(
        &self,
        acct: &Account<'_>,
        batch: &[&'u ValidUser],
        processed: Option<u64>,
    ) -> Result<Vec<&'u ValidUser>, Stop> {
        match processed {
            Some(n) if (n as usize) < batch.len() => {
                tracing::warn!(
                    sent = batch.len(),
                    processed = n,
                    "Wazzup processed fewer users than sent; checking which landed"
                );
                self.confirm_landed(acct, batch).await.map_err(|e| match e {
                    ApiError::Unauthorized { status } => Stop::Auth(status),
                    e => Stop::Transient(format!("could not confirm a partial batch: {e}")),
                })
            }
            _ => Ok(batch.to_vec()),
        }
    }

    /// Reads the account's users to see which of the batch landed as sent.
    async fn confirm_landed<'u>(
        &self,
        acct: &Account<'_>,
        batch: &[&'u ValidUser],
    ) -> Result<Vec<&'u ValidUser>, ApiError> {
        let remote: HashMap<String, UserPayload> = self
            .client
            .get_all_users(acct)
            .await?
            .into_iter()
            .map(|u| (u.id.to_string(), u))
            .collect();
        Ok(batch
            .iter()
            .copied()
            .filter(|u| match remote.get(u.payload.id.as_str()) {
                // Wazzup drops a phone it finds malformed; the rest must match.
                Some(r) => {
                    r.name == u.payload.name && (r.phone == u.payload.phone || r.phone.is_none())
                }
                None => false,
            })
            .collect())
    }

    /// The mirror learns what landed, and the history records it: an update shows what Wazzup
    /// held before (the user as the mirror knew it, or as it went in a first round).
    async fn record_landed(
        &self,
        job: &Job<'_>,
        landed: &[&ValidUser],
        push: &mut Push<'_, '_>,
    ) -> Result<(), StateError> {
        let interim: HashMap<&str, &str> = push
            .interim
            .iter()
            .map(|(id, _)| id.as_str())
            .filter_map(|id| push.real.get(id).map(|u| (id, u.payload.name.as_str())))
            .collect();
        let notes: Vec<state::Landed<'_>> = landed
            .iter()
            .map(|u| {
                let id = u.payload.id.as_str();
                let before = match (interim.get(id), job.drifted.get(id)) {
                    (Some(name), _) => Some(state::Shown {
                        name: Some(name.to_string()),
                        phone: None,
                    }),
                    // Put back after an edit in Wazzup: what Wazzup held.
                    (None, Some(held)) => held.clone(),
                    (None, None) => push.known.contains(id).then(|| job.shown(id)),
                };
                state::Landed {
                    user: u,
                    before,
                    cause: job.cause_of(Entity::User, id),
                }
            })
            .collect();
        // Their dead letters close once, after the stage (`close_dead_letters`), from the mirror.
        state::upsert_mirror(&self.state, job.id(), &notes, job.record.cycle).await?;
        let updated = notes.iter().filter(|n| n.before.is_some()).count() as u64;
        super::report::changes_recorded("user_updated", updated);
        super::report::changes_recorded("user_created", notes.len() as u64 - updated);
        push.known
            .extend(landed.iter().map(|u| u.payload.id.to_string()));
        push.queue.landed(landed.len());
        let acked = landed
            .iter()
            .map(|u| (u.payload.id.clone(), u.hash.clone()));
        if push.first_round {
            push.interim.extend(acked);
        } else {
            push.acked.extend(acked);
        }
        Ok(())
    }

    /// Dead-letters users Wazzup refused, with a line each.
    async fn record_refused(
        &self,
        job: &Job<'_>,
        refused: Vec<RemoteRejection>,
        push: &mut Push<'_, '_>,
        report: &mut AccountReport,
    ) -> Result<(), StateError> {
        for r in &refused {
            tracing::warn!(record_id = %r.record_id, code = %r.code, description = %mask_digits(&r.message),
                http_status = r.http_status, "Wazzup refused a user");
        }
        push.refused
            .extend(refused.iter().map(|r| r.record_id.clone()));
        report.rejected_remotely += refused.len();
        let opened = state::record_rejected(&self.state, job.id(), &refused, &job.record);
        super::report::changes_recorded("refused", opened.await?);
        Ok(())
    }
}

impl<'m, 'u> Push<'m, 'u> {
    /// The user as the CRM has it (a user of the first round goes without its phone); None for
    /// a user who left the CRM.
    fn real_of(&self, u: &ValidUser) -> Option<&'u ValidUser> {
        self.real.get(u.payload.id.as_str()).copied()
    }

    /// Asks the queue what a refusal means, and keeps what must be remembered: the answer of a
    /// full account, and why held users were refused. Returns the users refused now.
    fn refuse(&mut self, batch: Vec<&'m ValidUser>, e: &ApiError) -> Vec<RemoteRejection> {
        let ApiError::Rejected {
            status,
            code,
            description,
            indexes,
        } = e
        else {
            return Vec::new();
        };
        let refusal = if e.code_is("USER_LIMIT_EXCEEDED") {
            Refusal::UserLimit
        } else if e.code_is("USER_ALREADY_EXISTS") {
            Refusal::PhoneTaken
        } else {
            Refusal::Other
        };
        let first = self.real_of(batch[0]).unwrap_or(batch[0]);
        let first = user_rejection(first, *status, code, description);
        let was_full = self.queue.is_full();
        match self.queue.refused(batch, refusal, indexes) {
            Verdict::Refuse(users) => {
                if !was_full && self.queue.is_full() {
                    tracing::error!(code = %code, "The account reached Wazzup's user limit; no more users are created this cycle");
                    self.limit = Some((*status, code.clone(), description.clone()));
                }
                if refusal == Refusal::UserLimit {
                    let real: Vec<&'u ValidUser> =
                        users.iter().filter_map(|u| self.real_of(u)).collect();
                    self.full_refused.extend(real);
                }
                users
                    .iter()
                    .map(|u| {
                        user_rejection(self.real_of(u).unwrap_or(u), *status, code, description)
                    })
                    .collect()
            }
            Verdict::Held => {
                self.held.insert(first.record_id.clone(), first);
                Vec::new()
            }
            Verdict::Requeued => Vec::new(),
        }
    }
}

/// One WARN line per user sent without its phone because the phone could not be read.
fn warn_unreadable_phones(due: &[&ValidUser]) {
    for u in due {
        if let Some(phone) = &u.unreadable_phone {
            tracing::warn!(
                entity = "user",
                record_id = %u.payload.id,
                code = "unreadable_phone",
                reason = "The phone could not be read as a phone number; the user is sent without one",
                phone = %phone,
                "Sending a user without its phone"
            );
        }
    }
}

/// A user Wazzup refused, as its dead letter keeps it.
fn user_rejection(u: &ValidUser, status: u16, code: &str, description: &str) -> RemoteRejection {
    RemoteRejection {
        entity: Entity::User,
        record_id: u.payload.id.to_string(),
        code: code.to_string(),
        message: if description.is_empty() {
            format!("Wazzup answered HTTP {status} {code}")
        } else {
            description.to_string()
        },
        http_status: Some(status),
        payload: serde_json::to_value(&u.payload).unwrap_or_default(),
        payload_hash: u.hash.clone(),
    }
}
