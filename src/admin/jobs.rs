//! Background jobs of the admin API (verify, gc, prefetch): each runs as a task of its own
//! and is answered at once with its id; `GET /api/v1/jobs/<id>` tells its state, its
//! progress while it runs, and its result or error once it ended. A job whose task panics
//! is `failed`, not forever `running`. The registry keeps the last [`KEPT`] jobs.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;
use serde_json::Value;

use crate::cache::inventory::rfc3339;

/// Jobs kept (running ones always are); the oldest ended ones go first.
const KEPT: usize = 100;

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct JobView {
    pub id: u64,
    /// `verify`, `gc`, `prefetch`.
    pub kind: &'static str,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// What the job says of its progress (its own fields), `null` before it said anything.
    pub progress: Value,
    /// Its result once `done`.
    pub result: Value,
    /// Why it `failed`.
    pub error: Option<String>,
    #[serde(with = "rfc3339")]
    pub started: SystemTime,
    #[serde(with = "rfc3339::option")]
    pub finished: Option<SystemTime>,
}

/// The jobs of one server.
#[derive(Default)]
pub struct Jobs {
    next: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Mutex<JobView>>>>,
}

/// What a job's task holds to report its progress.
#[derive(Clone)]
pub struct Reporter(Arc<Mutex<JobView>>);

impl Reporter {
    pub fn progress(&self, progress: impl Serialize) {
        lock(&self.0).progress = serde_json::to_value(progress).unwrap_or(Value::Null);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Jobs {
    /// Starts `work` as job `kind`, on a task of its own; returns the job as it starts.
    pub fn start<F, Fut, T>(&self, kind: &'static str, work: F) -> JobView
    where
        F: FnOnce(Reporter) -> Fut,
        Fut: Future<Output = Result<T, String>> + Send + 'static,
        T: Serialize + Send + 'static,
    {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Mutex::new(JobView {
            id,
            kind,
            state: "running",
            progress: Value::Null,
            result: Value::Null,
            error: None,
            started: crate::clock::now(),
            finished: None,
        }));
        let view = lock(&job).clone();
        {
            let mut jobs = lock(&self.jobs);
            jobs.insert(id, job.clone());
            self.forget_old(&mut jobs);
        }
        let task = tokio::spawn(work(Reporter(job.clone())));
        tokio::spawn(async move {
            let ended = match task.await {
                Ok(Ok(result)) => Ok(serde_json::to_value(result).unwrap_or(Value::Null)),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(format!("the job's task ended abnormally: {e}")),
            };
            let mut view = lock(&job);
            view.finished = Some(crate::clock::now());
            match ended {
                Ok(result) => {
                    view.state = "done";
                    view.result = result;
                }
                Err(e) => {
                    tracing::warn!(id = view.id, kind = view.kind, error = %e, "job failed");
                    view.state = "failed";
                    view.error = Some(e);
                }
            }
        });
        view
    }

    /// Drops the oldest ended jobs beyond [`KEPT`].
    fn forget_old(&self, jobs: &mut BTreeMap<u64, Arc<Mutex<JobView>>>) {
        let mut excess = jobs.len().saturating_sub(KEPT);
        jobs.retain(|_, j| {
            if excess > 0 && lock(j).state != "running" {
                excess -= 1;
                return false;
            }
            true
        });
    }

    pub fn get(&self, id: u64) -> Option<JobView> {
        let job = lock(&self.jobs).get(&id).cloned()?;
        let view = lock(&job).clone();
        Some(view)
    }

    /// Every job kept, oldest first.
    pub fn list(&self) -> Vec<JobView> {
        let jobs: Vec<_> = lock(&self.jobs).values().cloned().collect();
        jobs.iter().map(|j| lock(j).clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn ended(jobs: &Jobs, id: u64) -> JobView {
        loop {
            let v = jobs.get(id).unwrap();
            if v.state != "running" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn jobs_report_progress_results_errors_and_panics() {
        let jobs = Jobs::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let ok = jobs.start("verify", |r| async move {
            r.progress(serde_json::json!({"checked": 1}));
            let _ = rx.await;
            Ok::<_, String>(serde_json::json!({"checked": 2}))
        });
        assert_eq!((ok.id, ok.state), (1, "running"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(jobs.get(1).unwrap().progress["checked"], 1);
        tx.send(()).unwrap();
        let v = ended(&jobs, 1).await;
        assert_eq!((v.state, &v.result["checked"]), ("done", &2.into()));
        assert!(v.finished.is_some());

        let failed = jobs.start("gc", |_| async { Err::<(), _>("no disk".to_string()) });
        let v = ended(&jobs, failed.id).await;
        assert_eq!((v.state, v.error.as_deref()), ("failed", Some("no disk")));

        let panics = jobs.start("gc", |_| async {
            if true {
                panic!("a bug");
            }
            Ok::<(), String>(())
        });
        let v = ended(&jobs, panics.id).await;
        assert_eq!(v.state, "failed");
        assert_eq!(jobs.list().len(), 3);
        assert!(jobs.get(99).is_none());
    }
}
