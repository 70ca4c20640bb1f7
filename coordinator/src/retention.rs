//! Which finished sets a group's retention policy lets go.
//!
//! Consistent sets: a set is kept if any rule keeps it — the newest `keep-last`, every set
//! younger than `max-age`, and grandfather-father-son: the newest set of each of the last
//! `keep-hourly` hours (likewise days, ISO weeks, months; UTC) that have a set. The newest
//! consistent set is always kept, so a group whose schedule stopped never loses its last
//! good copy; with `keep-verified`, so is the newest set whose restore drill passed (the last
//! copy proven to restore). Failed sets hold no snapshots once aborted; their catalog entries are kept for
//! diagnosis while younger than `max-age` (when set) and among the newest 10.

use std::collections::HashSet;

use chrono::{DateTime, Datelike};

use crate::catalog::FinishedSet;
use crate::config::RetentionConfig;

/// The calendar bucket (hour, day, week, month) a creation time falls in.
type BucketOf = fn(u64) -> i64;

/// How many failed sets are kept for diagnosis.
pub const KEEP_FAILED: usize = 10;

/// Ids of the sets to delete, oldest first. `sets` in any order.
/// `newest_verified`: the group's newest set whose restore drill passed, kept when the policy
/// says `keep-verified`.
pub fn expired(
    sets: &[FinishedSet],
    policy: &RetentionConfig,
    now_ms: u64,
    newest_verified: Option<&str>,
) -> Vec<String> {
    let mut sorted: Vec<&FinishedSet> = sets.iter().collect();
    sorted.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    let young = |set: &FinishedSet| {
        policy
            .max_age
            .is_some_and(|age| set.created_at_ms + age.as_millis() as u64 >= now_ms)
    };
    let consistent: Vec<&FinishedSet> = sorted.iter().copied().filter(|s| s.consistent).collect();
    let mut keep: HashSet<&str> = HashSet::new();
    if let Some(newest) = consistent.first() {
        keep.insert(&newest.id);
    }
    if policy.keep_verified
        && let Some(id) = newest_verified
        && let Some(set) = consistent.iter().find(|s| s.id == id)
    {
        keep.insert(&set.id);
    }
    if let Some(n) = policy.keep_last {
        keep.extend(consistent.iter().take(n as usize).map(|s| s.id.as_str()));
    }
    keep.extend(
        consistent
            .iter()
            .filter(|s| young(s))
            .map(|s| s.id.as_str()),
    );
    let buckets: [(Option<u32>, BucketOf); 4] = [
        (policy.keep_hourly, |ms| (ms / 3_600_000) as i64),
        (policy.keep_daily, |ms| (ms / 86_400_000) as i64),
        // ISO weeks start on Monday; 1970-01-01 was a Thursday.
        (policy.keep_weekly, |ms| ((ms / 86_400_000) as i64 + 3) / 7),
        (policy.keep_monthly, month_of),
    ];
    for (count, bucket_of) in buckets {
        let Some(count) = count else { continue };
        let mut seen = HashSet::new();
        for set in &consistent {
            if seen.len() >= count as usize {
                break;
            }
            if seen.insert(bucket_of(set.created_at_ms)) {
                keep.insert(&set.id);
            }
        }
    }
    let mut failed_seen = 0;
    for set in sorted.iter().filter(|s| !s.consistent) {
        failed_seen += 1;
        let too_old = policy.max_age.is_some() && !young(set);
        if failed_seen <= KEEP_FAILED && !too_old {
            keep.insert(&set.id);
        }
    }
    sorted
        .iter()
        .rev()
        .filter(|s| !keep.contains(s.id.as_str()))
        .map(|s| s.id.clone())
        .collect()
}

fn month_of(ms: u64) -> i64 {
    DateTime::from_timestamp_millis(ms as i64)
        .map(|t| i64::from(t.year()) * 12 + i64::from(t.month0()))
        .unwrap_or(0)
}

/// One line for `quiescectl groups`.
pub fn describe(policy: Option<&RetentionConfig>) -> String {
    let Some(policy) = policy else {
        return "keep all".into();
    };
    let mut parts = Vec::new();
    if let Some(n) = policy.keep_last {
        parts.push(format!("last {n}"));
    }
    if let Some(age) = policy.max_age {
        parts.push(format!("younger than {}", humantime::format_duration(age)));
    }
    for (count, name) in [
        (policy.keep_hourly, "hourly"),
        (policy.keep_daily, "daily"),
        (policy.keep_weekly, "weekly"),
        (policy.keep_monthly, "monthly"),
    ] {
        if let Some(n) = count {
            parts.push(format!("{n} {name}"));
        }
    }
    if policy.keep_verified {
        parts.push("the newest verified".into());
    }
    format!("keep {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;
    /// 2026-11-02T00:00:00Z, a Monday.
    const MONDAY: u64 = 1_793_577_600_000;

    fn set(id: &str, at: u64, consistent: bool) -> FinishedSet {
        FinishedSet {
            id: id.into(),
            consistent,
            created_at_ms: at,
            finished_at_ms: at + 1000,
        }
    }

    /// One consistent set every hour for `hours` hours, ids `h0` (oldest) …
    fn hourly(hours: u64) -> Vec<FinishedSet> {
        (0..hours)
            .map(|h| set(&format!("h{h}"), MONDAY + h * HOUR, true))
            .collect()
    }

    #[test]
    fn monday_is_a_monday() {
        let t = DateTime::from_timestamp_millis(MONDAY as i64).unwrap();
        assert_eq!(t.weekday(), chrono::Weekday::Mon);
        assert_eq!(t.hour_of_day(), 0);
    }

    trait HourOfDay {
        fn hour_of_day(&self) -> u32;
    }
    impl HourOfDay for DateTime<chrono::Utc> {
        fn hour_of_day(&self) -> u32 {
            chrono::Timelike::hour(self)
        }
    }

    #[test]
    fn keep_last_keeps_the_newest_n_and_expires_the_rest_oldest_first() {
        let sets = hourly(5);
        let policy = RetentionConfig {
            keep_last: Some(2),
            ..Default::default()
        };
        assert_eq!(
            expired(&sets, &policy, MONDAY + 5 * HOUR, None),
            ["h0", "h1", "h2"]
        );
    }

    #[test]
    fn max_age_expires_older_sets_but_never_the_newest_consistent_one() {
        let sets = hourly(5);
        let policy = RetentionConfig {
            max_age: Some(Duration::from_secs(2 * 3600)),
            ..Default::default()
        };
        // Now = 1 h after h4: h2 (3 h old) and older expire, h3 and h4 are young.
        assert_eq!(
            expired(&sets, &policy, MONDAY + 5 * HOUR, None),
            ["h0", "h1", "h2"]
        );
        // Much later every set is too old, but the newest consistent one stays.
        assert_eq!(
            expired(&sets, &policy, MONDAY + 100 * DAY, None),
            ["h0", "h1", "h2", "h3"]
        );
    }

    #[test]
    fn gfs_keeps_the_newest_set_of_each_recent_hour_day_and_week() {
        // One set every 6 hours for 3 weeks: 84 sets, 4 per day.
        let sets: Vec<FinishedSet> = (0..84)
            .map(|i| set(&format!("s{i:02}"), MONDAY + i * 6 * HOUR, true))
            .collect();
        let policy = RetentionConfig {
            keep_hourly: Some(2),
            keep_daily: Some(3),
            keep_weekly: Some(2),
            ..Default::default()
        };
        let gone: HashSet<String> = expired(&sets, &policy, MONDAY + 21 * DAY, None)
            .into_iter()
            .collect();
        let kept: Vec<&str> = sets
            .iter()
            .filter(|s| !gone.contains(&s.id))
            .map(|s| s.id.as_str())
            .collect();
        // Hourly: s83, s82 (their own hours). Daily: newest of days 20, 19, 18 = s83, s79, s75.
        // Weekly: newest of weeks 2 and 1 = s83, s55.
        assert_eq!(kept, ["s55", "s75", "s79", "s82", "s83"]);
    }

    #[test]
    fn gfs_monthly_counts_calendar_months() {
        // 2026-11-02, 2026-10-30, 2026-10-01, 2026-09-15.
        let sets = vec![
            set("nov", MONDAY, true),
            set("oct-late", MONDAY - 3 * DAY, true),
            set("oct-early", MONDAY - 32 * DAY, true),
            set("sep", MONDAY - 48 * DAY, true),
        ];
        let policy = RetentionConfig {
            keep_monthly: Some(2),
            ..Default::default()
        };
        assert_eq!(expired(&sets, &policy, MONDAY, None), ["sep", "oct-early"]);
    }

    #[test]
    fn failed_sets_are_kept_for_diagnosis_only_while_few_and_young() {
        let mut sets = vec![set("good", MONDAY, true)];
        for i in 0..12 {
            sets.push(set(&format!("f{i:02}"), MONDAY + (i + 1) * HOUR, false));
        }
        let policy = RetentionConfig {
            keep_last: Some(5),
            ..Default::default()
        };
        assert_eq!(expired(&sets, &policy, MONDAY + DAY, None), ["f00", "f01"]);
        let aged = RetentionConfig {
            keep_last: Some(5),
            max_age: Some(Duration::from_secs(3 * 3600)),
            ..Default::default()
        };
        let gone = expired(&sets, &aged, MONDAY + 13 * HOUR, None);
        assert!(gone.contains(&"f08".to_string()) && !gone.contains(&"f10".to_string()));
        assert!(!gone.contains(&"good".to_string()));
    }

    #[test]
    fn keep_verified_keeps_the_newest_set_whose_drill_passed() {
        let sets = hourly(6);
        let policy = RetentionConfig {
            keep_last: Some(2),
            keep_verified: true,
            ..Default::default()
        };
        // h1 is the newest set a drill passed: it stays with the newest two.
        assert_eq!(
            expired(&sets, &policy, MONDAY + 6 * HOUR, Some("h1")),
            ["h0", "h2", "h3"]
        );
        // Without the option, or with no verified set, only the other rules count.
        let plain = RetentionConfig {
            keep_verified: false,
            ..policy.clone()
        };
        assert_eq!(
            expired(&sets, &plain, MONDAY + 6 * HOUR, Some("h1")),
            ["h0", "h1", "h2", "h3"]
        );
        assert_eq!(
            expired(&sets, &policy, MONDAY + 6 * HOUR, None),
            ["h0", "h1", "h2", "h3"]
        );
        // A verified id that is not a consistent set of the group keeps nothing extra.
        let mut with_failed = sets.clone();
        with_failed.push(set("f", MONDAY + 30 * 60_000, false));
        assert_eq!(
            expired(&with_failed, &policy, MONDAY + 6 * HOUR, Some("f")),
            ["h0", "h1", "h2", "h3"]
        );
        assert!(describe(Some(&policy)).contains("the newest verified"));
    }
}
