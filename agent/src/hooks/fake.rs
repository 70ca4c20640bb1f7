//! A hand-written fake hook for unit tests of ordering, timeouts and failure paths: every call
//! is appended to a shared log as `NAME PHASE`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{DbPath, Hook, HookContext, HookResult, HookSession, HookValues};

#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, line: String) {
        self.0.lock().unwrap().push(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

/// Called at quiesce and resume; what it returns is appended to the log line (tests use it to
/// see whether the filesystems were frozen at that moment).
pub type Probe = Arc<dyn Fn() -> String + Send + Sync>;

/// What the fake does in each phase.
#[derive(Clone, Default)]
pub struct Script {
    pub probe: Option<Probe>,
    pub fail_prepare: Option<String>,
    pub fail_quiesce: Option<String>,
    pub fail_resume: Option<String>,
    pub quiesce_delay: Duration,
    pub paths: Vec<DbPath>,
}

#[derive(Clone)]
pub struct FakeHook {
    name: String,
    log: Log,
    script: Script,
}

impl FakeHook {
    pub fn new(name: &str, log: &Log, script: Script) -> Self {
        FakeHook {
            name: name.into(),
            log: log.clone(),
            script,
        }
    }
}

impl FakeHook {
    fn probe(&self) -> String {
        match &self.script.probe {
            Some(probe) => format!(" {}", probe()),
            None => String::new(),
        }
    }
}

#[tonic::async_trait]
impl Hook for FakeHook {
    fn kind(&self) -> &'static str {
        "fake"
    }

    async fn paths(&self) -> HookResult<Vec<DbPath>> {
        Ok(self.script.paths.clone())
    }

    async fn prepare(&self, _ctx: &HookContext) -> HookResult<Box<dyn HookSession>> {
        self.log.push(format!("{} prepare", self.name));
        if let Some(message) = &self.script.fail_prepare {
            return Err(message.clone());
        }
        Ok(Box::new(FakeSession {
            hook: self.clone(),
            values: HookValues::default(),
        }))
    }
}

struct FakeSession {
    hook: FakeHook,
    values: HookValues,
}

#[tonic::async_trait]
impl HookSession for FakeSession {
    async fn quiesce(&mut self) -> HookResult<()> {
        self.hook
            .log
            .push(format!("{} quiesce{}", self.hook.name, self.hook.probe()));
        tokio::time::sleep(self.hook.script.quiesce_delay).await;
        if let Some(message) = &self.hook.script.fail_quiesce {
            return Err(message.clone());
        }
        self.values.set("position", "42");
        Ok(())
    }

    async fn resume(&mut self, froze: bool) -> HookResult<()> {
        self.hook.log.push(format!(
            "{} resume froze={froze}{}",
            self.hook.name,
            self.hook.probe()
        ));
        match &self.hook.script.fail_resume {
            Some(message) => Err(message.clone()),
            None => Ok(()),
        }
    }

    async fn release(&mut self) {
        self.hook.log.push(format!("{} release", self.hook.name));
    }

    fn output(&self) -> HookValues {
        self.values.clone()
    }
}
