//! The eight plan-only stand-ins: `discovery.scan.registry`, `source.suggest.enrich`,
//! `update.check.batch`, `update.apply.package`, `cleanup.quarantine`, `ai.analyze`,
//! `ai.recommend` and `ai.repair.plan`.
//!
//! Each checks its payload as a real handler would, runs the seed's gate where the seed asks
//! for one (`update.apply.package`, `cleanup.quarantine`), logs what it would do through the
//! job's log, and returns an output with `plan_only = true` and [`PLAN_ONLY_NOTE`]. None of them
//! reads the machine or changes anything: they make the catalog servable end to end while the
//! real handlers are written.

use jobwire::{HandlerError, JobContext};

use crate::invalid_payload;
use crate::pb::{self, AnalyzeScope, RequestedMode, RiskLevel, ScanSource, SuggestMode};

/// The note every stand-in returns.
pub const PLAN_ONLY_NOTE: &str = "plan only: no changes made";

/// The candidates per software id when the payload leaves it at 0: the seed's sample value.
const DEFAULT_CANDIDATES: i32 = 5;

/// The recommendations when the payload leaves the limit at 0: the seed's sample value.
const DEFAULT_RECOMMENDATIONS: i32 = 5;

/// Logs the plan and returns the note for the output.
fn plan_only(ctx: &JobContext, plan: &str) -> String {
    ctx.info(format!("plan only: {plan}"));
    ctx.info(PLAN_ONLY_NOTE);
    PLAN_ONLY_NOTE.to_owned()
}

/// Fails the attempt for good when `value` is blank: the payload lacks `field`.
fn required(field: &str, value: &str) -> Result<(), HandlerError> {
    if value.trim().is_empty() {
        Err(invalid_payload(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// A payload enum that must be set: unknown numbers and UNSPECIFIED are refused.
fn known<E>(field: &str, value: i32, unspecified: E) -> Result<E, HandlerError>
where
    E: TryFrom<i32> + PartialEq,
{
    match E::try_from(value) {
        Ok(e) if e != unspecified => Ok(e),
        _ => Err(invalid_payload(format!(
            "{field} must be set (got {value})"
        ))),
    }
}

/// The seed's gate before `update.apply.package` and `cleanup.quarantine` ("安全校验要求"):
/// CONFIRM mode needs `confirm = true`; HIGH risk needs `confirm = true` and an approval ticket.
/// A refusal is fatal: the same request would be refused again.
fn gate(
    ctx: &JobContext,
    mode: RequestedMode,
    risk: RiskLevel,
    confirm: bool,
    ticket_id: &str,
) -> Result<(), HandlerError> {
    let refusal = if mode == RequestedMode::Confirm && !confirm {
        Some("CONFIRM mode needs confirm = true".to_owned())
    } else if risk == RiskLevel::High && !confirm {
        Some("HIGH risk needs confirm = true".to_owned())
    } else if risk == RiskLevel::High && ticket_id.trim().is_empty() {
        Some("HIGH risk needs an approval ticket (ticket_id)".to_owned())
    } else {
        None
    };
    match refusal {
        Some(reason) => {
            ctx.warn(format!("gate refused: {reason}"));
            Err(HandlerError::fatal(format!("gate refused: {reason}")).with_kind("gate_refused"))
        }
        None => {
            ctx.info(format!(
                "gate passed: {} at {} risk",
                mode.as_str_name(),
                risk.as_str_name()
            ));
            Ok(())
        }
    }
}

/// `discovery.scan.registry`: names the hives a scan would read.
///
/// # Errors
///
/// Fatal when neither hive is asked for.
pub async fn discovery_scan_registry(
    ctx: JobContext,
    job: pb::DiscoveryScanRegistry,
) -> Result<pb::DiscoveryScanRegistryOutput, HandlerError> {
    // The seed knows only the registry, so an unset source means it.
    if ScanSource::try_from(job.source).is_err() {
        return Err(invalid_payload(format!("unknown source {}", job.source)));
    }
    let planned_hives: Vec<String> = [("HKLM", job.include_hklm), ("HKCU", job.include_hkcu)]
        .into_iter()
        .filter(|&(_, wanted)| wanted)
        .map(|(hive, _)| hive.to_owned())
        .collect();
    if planned_hives.is_empty() {
        return Err(invalid_payload(
            "neither include_hklm nor include_hkcu: nothing to scan",
        ));
    }
    let reason =
        pb::ScanReason::try_from(job.scan_reason).map_or("unknown", |reason| reason.as_str_name());
    let note = plan_only(
        &ctx,
        &format!(
            "would scan the uninstall keys of {} ({reason})",
            planned_hives.join(" and ")
        ),
    );
    Ok(pb::DiscoveryScanRegistryOutput {
        plan_only: true,
        note,
        planned_hives,
    })
}

/// `source.suggest.enrich`: counts the child jobs a batch would fan out into.
///
/// # Errors
///
/// Fatal when the mode is unset, a single request has not exactly one id, a batch has none, or
/// the candidate limit is negative.
pub async fn source_suggest_enrich(
    ctx: JobContext,
    job: pb::SourceSuggestEnrich,
) -> Result<pb::SourceSuggestEnrichOutput, HandlerError> {
    let mode = known("mode", job.mode, SuggestMode::Unspecified)?;
    let ids = job.software_ids.len();
    match mode {
        SuggestMode::Single if ids != 1 => {
            return Err(invalid_payload(format!(
                "SINGLE mode needs one software id, not {ids}"
            )));
        }
        SuggestMode::Batch if ids == 0 => {
            return Err(invalid_payload("BATCH mode needs software ids"));
        }
        _ => {}
    }
    let candidates = match job.max_candidates_per_software {
        0 => DEFAULT_CANDIDATES,
        n if n < 0 => {
            return Err(invalid_payload(format!(
                "max_candidates_per_software {n} is negative"
            )));
        }
        n => n,
    };
    // A batch fans out into one child per id; a single request is its own child.
    let planned_children = if mode == SuggestMode::Batch {
        i32::try_from(ids).unwrap_or(i32::MAX)
    } else {
        0
    };
    let note = plan_only(
        &ctx,
        &format!(
            "would suggest up to {candidates} sources for each of {ids} software ids \
             ({planned_children} child jobs)"
        ),
    );
    Ok(pb::SourceSuggestEnrichOutput {
        plan_only: true,
        note,
        planned_children,
    })
}

/// `update.check.batch`: a batch of several software ids fans out into one child batch per id
/// and waits for them; once they have all ended it runs again and gathers the ids they
/// checked. A batch of one id (a child) is the check itself, and an empty batch plans a check
/// of everything known; both plan only.
///
/// # Errors
///
/// Fatal when no provider is named; retryable when the server cannot be reached to enqueue or
/// read the children.
pub async fn update_check_batch(
    ctx: JobContext,
    job: pb::UpdateCheckBatch,
) -> Result<pb::UpdateCheckBatchOutput, HandlerError> {
    required("provider", &job.provider)?;
    if ctx.children_ended() {
        return gather_checks(&ctx, job).await;
    }
    if job.software_ids.len() > 1 {
        let children: Vec<pb::UpdateCheckBatch> = job
            .software_ids
            .iter()
            .map(|&id| pb::UpdateCheckBatch {
                software_ids: vec![id],
                provider: job.provider.clone(),
                include_prerelease: job.include_prerelease,
            })
            .collect();
        ctx.enqueue_children(children)
            .await
            .map_err(HandlerError::from_error)?;
        ctx.info(format!(
            "fanned out {} checks with {}",
            job.software_ids.len(),
            job.provider
        ));
        return Err(ctx.wait_for_children());
    }
    let what = if job.software_ids.is_empty() {
        "every known piece of software".to_owned()
    } else {
        format!("{} software ids", job.software_ids.len())
    };
    let note = plan_only(
        &ctx,
        &format!(
            "would check {what} with {}{}, one child job each",
            job.provider,
            if job.include_prerelease {
                ", pre-releases included"
            } else {
                ""
            }
        ),
    );
    Ok(pb::UpdateCheckBatchOutput {
        plan_only: true,
        note,
        planned_checks: job.software_ids,
        provider: job.provider,
    })
}

/// The ids the children of a batch checked, in order, and how many of them failed.
async fn gather_checks(
    ctx: &JobContext,
    job: pb::UpdateCheckBatch,
) -> Result<pb::UpdateCheckBatchOutput, HandlerError> {
    let children = ctx.children().await.map_err(HandlerError::from_error)?;
    let mut checked = Vec::new();
    let mut failed = 0;
    for child in &children {
        match child
            .result::<pb::UpdateCheckBatch>()
            .map_err(HandlerError::from_error)?
        {
            Some(output) => checked.extend(output.planned_checks),
            None => failed += 1,
        }
    }
    checked.sort_unstable();
    Ok(pb::UpdateCheckBatchOutput {
        plan_only: true,
        note: format!(
            "{} of {} checks with {} done by child jobs ({failed} failed); {PLAN_ONLY_NOTE}",
            checked.len(),
            children.len(),
            job.provider
        ),
        planned_checks: checked,
        provider: job.provider,
    })
}

/// `update.apply.package`: runs the gate and lists the steps an update would take.
///
/// # Errors
///
/// Fatal for a missing package, an unset mode or risk, or a gate refusal (`gate_refused`).
pub async fn update_apply_package(
    ctx: JobContext,
    job: pb::UpdateApplyPackage,
) -> Result<pb::UpdateApplyPackageOutput, HandlerError> {
    required("package_id", &job.package_id)?;
    let mode = known(
        "requested_mode",
        job.requested_mode,
        RequestedMode::Unspecified,
    )?;
    let risk = known("risk_level", job.risk_level, RiskLevel::Unspecified)?;
    gate(&ctx, mode, risk, job.confirm, &job.ticket_id)?;
    let package = &job.package_id;
    let planned_steps = vec![
        format!("resolve {package} with the package manager"),
        format!("record the installed version of {package} for a rollback"),
        format!("install the update of {package}"),
        format!("check the installed version of {package}"),
    ];
    let note = plan_only(
        &ctx,
        &format!("would update {package} in {} steps", planned_steps.len()),
    );
    Ok(pb::UpdateApplyPackageOutput {
        plan_only: true,
        note,
        package_id: job.package_id,
        gate_passed: true,
        planned_steps,
    })
}

/// `cleanup.quarantine`: runs the gate, honours the seed's failure simulations, and lists the
/// steps a quarantine would take.
///
/// # Errors
///
/// As [`update_apply_package`]; also retryable `simulated_failure` and fatal
/// `simulated_rollback_failure` when the payload asks for them.
pub async fn cleanup_quarantine(
    ctx: JobContext,
    job: pb::CleanupQuarantine,
) -> Result<pb::CleanupQuarantineOutput, HandlerError> {
    required("package_id", &job.package_id)?;
    let mode = known(
        "requested_mode",
        job.requested_mode,
        RequestedMode::Unspecified,
    )?;
    let risk = known("risk_level", job.risk_level, RiskLevel::Unspecified)?;
    gate(&ctx, mode, risk, job.confirm, &job.ticket_id)?;
    let package = &job.package_id;
    // A failed rollback leaves the machine in an unknown state: a person must look, so it is
    // not retried. A plain failure rolled back cleanly and may be retried.
    if job.simulate_rollback_failure {
        ctx.error("simulated: the quarantine failed and so did its rollback");
        return Err(HandlerError::fatal(format!(
            "simulated: quarantining {package} failed and its rollback failed too \
             (plan only: nothing was changed)"
        ))
        .with_kind("simulated_rollback_failure"));
    }
    if job.simulate_failure {
        ctx.warn("simulated: the quarantine failed and was rolled back");
        return Err(HandlerError::retryable(format!(
            "simulated: quarantining {package} failed and was rolled back"
        ))
        .with_kind("simulated_failure"));
    }
    let planned_steps = vec![
        format!("record the files and registry keys of {package}"),
        format!("move {package} into quarantine"),
        format!("check that nothing depends on {package}; roll back if something does"),
    ];
    let note = plan_only(
        &ctx,
        &format!(
            "would quarantine {package} in {} steps",
            planned_steps.len()
        ),
    );
    Ok(pb::CleanupQuarantineOutput {
        plan_only: true,
        note,
        package_id: job.package_id,
        gate_passed: true,
        planned_steps,
    })
}

/// `ai.analyze`: names the software an analysis would cover.
///
/// # Errors
///
/// Fatal when the scope is unset, or a SUBSET has no ids.
pub async fn ai_analyze(
    ctx: JobContext,
    job: pb::AiAnalyze,
) -> Result<pb::AiAnalyzeOutput, HandlerError> {
    let scope = known("scope", job.scope, AnalyzeScope::Unspecified)?;
    let planned_software_ids = match scope {
        AnalyzeScope::Subset if job.software_ids.is_empty() => {
            return Err(invalid_payload("SUBSET scope needs software ids"));
        }
        AnalyzeScope::Subset => job.software_ids,
        _ => Vec::new(),
    };
    let what = if planned_software_ids.is_empty() {
        "all software".to_owned()
    } else {
        format!("{} software ids", planned_software_ids.len())
    };
    let note = plan_only(
        &ctx,
        &format!(
            "would analyze {what}{} (read-only, suggestions only)",
            if job.include_update_signal {
                " with update signals"
            } else {
                ""
            }
        ),
    );
    Ok(pb::AiAnalyzeOutput {
        plan_only: true,
        note,
        planned_software_ids,
    })
}

/// `ai.recommend`: echoes the goal; a stand-in recommends nothing.
///
/// # Errors
///
/// Fatal when the goal is empty or the limit negative.
pub async fn ai_recommend(
    ctx: JobContext,
    job: pb::AiRecommend,
) -> Result<pb::AiRecommendOutput, HandlerError> {
    required("goal", &job.goal)?;
    let constraints = job.constraints.unwrap_or_default();
    let limit = match constraints.max_recommendations {
        0 => DEFAULT_RECOMMENDATIONS,
        n if n < 0 => {
            return Err(invalid_payload(format!(
                "max_recommendations {n} is negative"
            )));
        }
        n => n,
    };
    let note = plan_only(
        &ctx,
        &format!(
            "would recommend up to {limit} programs for {:?}{}",
            job.goal,
            if constraints.prefer_open_source {
                ", open source first"
            } else {
                ""
            }
        ),
    );
    Ok(pb::AiRecommendOutput {
        plan_only: true,
        note,
        goal: job.goal,
        recommendations: Vec::new(),
    })
}

/// `ai.repair.plan`: a repair plan for a person to carry out; plan-only by the seed's own
/// definition.
///
/// # Errors
///
/// Fatal when the program or the issue is missing.
pub async fn ai_repair_plan(
    ctx: JobContext,
    job: pb::AiRepairPlan,
) -> Result<pb::AiRepairPlanOutput, HandlerError> {
    required("target_software", &job.target_software)?;
    required("issue", &job.issue)?;
    let target = &job.target_software;
    let mut steps = Vec::new();
    if job.collect_diagnostics {
        steps.push(format!(
            "collect the crash logs and version of {target} (not collected by this stand-in)"
        ));
    }
    steps.extend([
        format!(
            "check {target} for a pending update that addresses {:?}",
            job.issue
        ),
        format!("reset the settings of {target}, keeping a backup"),
        format!("reinstall {target} if the issue persists"),
    ]);
    let note = plan_only(
        &ctx,
        &format!("{} repair steps for {target}: {}", steps.len(), job.issue),
    );
    Ok(pb::AiRepairPlanOutput {
        plan_only: true,
        note,
        target_software: job.target_software,
        steps,
    })
}
