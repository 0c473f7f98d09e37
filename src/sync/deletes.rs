//! The deletes stage: users who left the CRM deleted from Wazzup, in batches, after the
//! settings stopped referencing them.

use wazzup_api::ApiError;

use super::account::Job;
use super::batch::{BatchQueue, Refusal, Verdict};
use super::report::AccountReport;
use super::{Engine, Stop};
use crate::domain::{Entity, Mirror, content_hash};
use crate::state::{self, RemoteRejection, Resolution, StateError};

impl Engine {
    /// Deletes `ids`; a refused batch is halved until the refused user stands alone.
    pub(super) async fn deletes_stage(
        &self,
        job: &Job<'_>,
        ids: &[String],
        mirror: &Mirror,
        report: &mut AccountReport,
    ) -> Result<Option<Stop>, StateError> {
        let id = job.id();
        // Deletions refused in earlier cycles: their dead letters close when they land.
        let refused_before: foldhash::HashSet<&str> = job
            .open_of(Entity::Delete)
            .map(|d| d.record_id.as_str())
            .collect();
        let mut queue = BatchQueue::new(ids.to_vec(), self.settings.sync.batch_size);
        while let Some(next) = queue.next(|_| false) {
            if self.stopping() {
                return Ok(Some(Stop::Shutdown));
            }
            let batch = next.send;
            match self.client.delete_users(&job.api, &batch).await {
                Ok(()) => {
                    let shown: Vec<state::Shown> = batch.iter().map(|u| job.shown(u)).collect();
                    let cause = job.cause_of(Entity::Delete, &batch[0]);
                    let gone = Some((job.record.cycle, cause, &shown[..]));
                    state::delete_mirror(&self.state, id, &batch, gone).await?;
                    super::report::changes_recorded("user_deleted", batch.len() as u64);
                    let closed: Vec<String> = batch
                        .iter()
                        .filter(|u| refused_before.contains(u.as_str()))
                        .cloned()
                        .collect();
                    let closed = state::resolve(
                        &self.state,
                        id,
                        Entity::Delete,
                        &closed,
                        Resolution::Synced,
                        &job.record,
                    );
                    super::report::changes_recorded("refusal_closed", closed.await?);
                    report.deleted += batch.len();
                }
                Err(ApiError::Unauthorized { status }) => return Ok(Some(Stop::Auth(status))),
                Err(ApiError::Transient { reason, .. }) => {
                    report.deferred += batch.len() + queue.len();
                    return Ok(Some(Stop::Transient(format!("deletes not sent: {reason}"))));
                }
                Err(e) => {
                    // Deletions are never singled out by index: halved until alone.
                    if let Verdict::Refuse(refused) = queue.refused(batch, Refusal::Other, &[]) {
                        self.delete_refused(job, &refused[0], &e, mirror, report)
                            .await?;
                    }
                }
            }
        }
        Ok(None)
    }

    /// A single user Wazzup would not delete.
    async fn delete_refused(
        &self,
        job: &Job<'_>,
        user_id: &str,
        e: &ApiError,
        mirror: &Mirror,
        report: &mut AccountReport,
    ) -> Result<(), StateError> {
        let account_id = job.id();
        let one = [user_id.to_string()];
        if !mirror.contains_key(user_id) {
            // Sent once but never recorded, and Wazzup does not want to delete it: it most
            // likely never landed. Forget it.
            return state::delete_mirror(&self.state, account_id, &one, None).await;
        }
        let ApiError::Rejected {
            status,
            code,
            description,
            ..
        } = e
        else {
            return Ok(());
        };
        report.rejected_remotely += 1;
        tracing::warn!(record_id = %user_id, code = %code, "Wazzup refused to delete a user");
        let refused = RemoteRejection {
            entity: Entity::Delete,
            record_id: user_id.to_string(),
            code: code.clone(),
            message: description.clone(),
            http_status: Some(*status),
            payload: serde_json::json!({ "user_ids": [user_id] }),
            payload_hash: content_hash(user_id.as_bytes()),
        };
        let refused = [refused];
        let opened = state::record_rejected(&self.state, account_id, &refused, &job.record);
        super::report::changes_recorded("refused", opened.await?);
        Ok(())
    }
}
