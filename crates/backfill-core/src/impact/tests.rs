//! Unit and property tests of the impact controller: learning the baseline, judging,
//! the pace's growth and cuts, and `plan`'s best case.
use super::*;
use proptest::prelude::*;

const CANARY: Duration = Duration::from_millis(50);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

thread_local! {
    /// Rows the simulated jobs committed, across the [`run`]s of one test (each test
    /// runs on a thread of its own).
    static ROWS: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// Drives `controller` from `from` for `span`, one canary every 50 ms whose round
/// trip `latency(rate)` gives from the pace in force; the jobs achieve the pace.
/// Returns the time reached and the last verdict.
fn run(
    controller: &mut ImpactController,
    from: Duration,
    span: Duration,
    active: bool,
    latency: impl Fn(Option<ImpactDirective>) -> Duration,
) -> (Duration, ImpactVerdict) {
    run_jobs_reaching(controller, from, span, active, f64::INFINITY, latency)
}

/// As [`run`], but the jobs reach at most `capacity` rows/s whatever the pace.
fn run_jobs_reaching(
    controller: &mut ImpactController,
    from: Duration,
    span: Duration,
    active: bool,
    capacity: f64,
    latency: impl Fn(Option<ImpactDirective>) -> Duration,
) -> (Duration, ImpactVerdict) {
    let mut now = from;
    let mut verdict = controller.evaluate(now, active);
    while now < from + span {
        now += CANARY;
        let rows = ROWS.with(|rows| {
            if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
                rows.set(rows.get() + rate.min(capacity) * CANARY.as_secs_f64());
            }
            rows.get()
        });
        controller.observe(now, latency(verdict.directive));
        controller.record_rows(now, rows as u64);
        verdict = controller.evaluate(now, active);
    }
    (now, verdict)
}

/// Production at 2 ms, plus 1 ms per 1 000 rows/s we write.
fn linear(directive: Option<ImpactDirective>) -> Duration {
    match directive {
        Some(ImpactDirective::Pace(rate)) => ms(2) + Duration::from_secs_f64(rate / 1e6),
        _ => ms(2),
    }
}

/// Canaries at 2 ms, but the first `count` of them stall 20 ms.
fn stalls(count: u32) -> impl Fn(Option<ImpactDirective>) -> Duration {
    let seen = std::cell::Cell::new(0);
    move |_: Option<ImpactDirective>| {
        seen.set(seen.get() + 1);
        if seen.get() <= count {
            ms(20)
        } else {
            ms(2)
        }
    }
}

/// Canaries at 2 ms, but every `nth` of the first `count × nth` stalls 20 ms: slow
/// canaries scattered a second apart at the 50 ms interval when `nth` is 20.
fn every(nth: u32, count: u32) -> impl Fn(Option<ImpactDirective>) -> Duration {
    let seen = std::cell::Cell::new(0u32);
    move |_: Option<ImpactDirective>| {
        seen.set(seen.get() + 1);
        if seen.get().is_multiple_of(nth) && seen.get() / nth <= count {
            ms(20)
        } else {
            ms(2)
        }
    }
}

/// Canaries at 2 ms, but every `nth` one while the jobs are paced stalls 20 ms: slow
/// canaries scattered among the batches, which the rests never see.
fn every_while_paced(nth: u32) -> impl Fn(Option<ImpactDirective>) -> Duration {
    let paced = std::cell::Cell::new(0u32);
    move |directive: Option<ImpactDirective>| match directive {
        Some(ImpactDirective::Pace(_)) => {
            paced.set(paced.get() + 1);
            if paced.get().is_multiple_of(nth) {
                ms(20)
            } else {
                ms(2)
            }
        }
        _ => ms(2),
    }
}

/// Canaries at 2 ms, but after gaps of 120 and then 25 calm ones a canary stalls 20 ms:
/// 1.4 %, one in seventy, as a pace just past the frontier puts over the line.
fn one_in_seventy() -> impl Fn(Option<ImpactDirective>) -> Duration {
    let seen = std::cell::Cell::new(0u32);
    move |_: Option<ImpactDirective>| {
        seen.set(seen.get() + 1);
        match seen.get() % 147 {
            121 | 0 => ms(20),
            _ => ms(2),
        }
    }
}

/// The default settings with no periodic rest (only the first): a test's canaries are
/// then all the evidence there is.
fn rest_only_at_start() -> ImpactSettings {
    ImpactSettings {
        relearn_every: Duration::from_secs(3600),
        ..ImpactSettings::default()
    }
}

/// A controller (periodic rests off) whose canaries ran flat at 2 ms until right after a
/// growth step, so that the canaries a test gives it next are all the evidence it has.
/// Returns it, the time reached and the pace before the step.
fn right_after_a_step(settings: ImpactSettings) -> (ImpactController, Duration, f64) {
    let settings = ImpactSettings {
        relearn_every: Duration::from_secs(3600),
        ..settings
    };
    let mut controller = ImpactController::new(settings, ms(0));
    let flat = |_: Option<ImpactDirective>| ms(2);
    let (mut now, _) = run(&mut controller, ms(0), ms(20_000), true, flat);
    let rate = controller.rate();
    while controller.rate() == rate {
        (now, _) = run(&mut controller, now, CANARY, true, flat);
    }
    (controller, now, rate)
}

/// How long calm canaries take to show calm to the sequential test from no evidence.
fn calm_after() -> Duration {
    CANARY * Evidence::canaries_to_calm()
}

#[test]
fn it_rests_first_to_learn_the_baseline() {
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    controller.observe(ms(10), ms(2));
    assert_eq!(
        controller.evaluate(ms(10), true).directive,
        Some(ImpactDirective::Rest)
    );
    let (_, verdict) = run(&mut controller, ms(10), ms(5_500), true, linear);
    let baseline = controller.baseline().expect("a baseline");
    assert!(
        baseline.abs_diff(ms(2)) < Duration::from_micros(1),
        "{baseline:?}"
    );
    assert!(matches!(verdict.directive, Some(ImpactDirective::Pace(_))));
}

#[test]
fn one_stray_canary_in_the_first_rest_does_not_set_the_baseline() {
    // A first rest of two seconds had its slowest canary as its p98: one stray of 20 ms
    // set a budget nothing ever exceeded (issue 19's frontier).
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let seen = std::cell::Cell::new(0);
    let one_stray = |_: Option<ImpactDirective>| {
        seen.set(seen.get() + 1);
        if seen.get() == 20 {
            ms(20)
        } else {
            ms(2)
        }
    };
    run(
        &mut controller,
        ms(0),
        DRAIN + FIRST_REST + CANARY,
        true,
        one_stray,
    );
    let baseline = controller.baseline().expect("a baseline");
    assert!(
        baseline.abs_diff(ms(2)) < Duration::from_micros(1),
        "{baseline:?}"
    );
}

#[test]
fn it_converges_below_the_budget_and_near_it() {
    let settings = ImpactSettings {
        floor: ms(1),
        ..rest_only_at_start()
    };
    let mut controller = ImpactController::new(settings, ms(0));
    // Budget: the larger of 1.3 × 2 ms and 2 ms + the 1 ms floor, so 3 ms: at most
    // 1 000 rows/s under `linear`.
    let (now, _) = run(
        &mut controller,
        ms(0),
        Duration::from_secs(60),
        true,
        linear,
    );
    let mut rates = Vec::new();
    let mut at = now;
    for _ in 0..40 {
        let (next, verdict) = run(&mut controller, at, GROW_AFTER, true, linear);
        at = next;
        if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
            rates.push(rate);
        }
    }
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    // One additive step over the limit at most, then a cut.
    assert!(rates.iter().all(|r| *r <= 1_000.0 * 1.1), "{rates:?}");
    assert!(mean >= 1_000.0 * 0.6, "mean {mean}: {rates:?}");
}

#[test]
fn noise_under_the_floor_is_never_over_budget() {
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    // 0.2 ms base, doubled by us: twice the baseline, but 0.2 ms is under the 500 µs
    // floor.
    let tiny = |d: Option<ImpactDirective>| match d {
        Some(ImpactDirective::Pace(_)) => Duration::from_micros(400),
        _ => Duration::from_micros(200),
    };
    // The first rest, then three doublings of slow start.
    let (_, verdict) = run(
        &mut controller,
        ms(0),
        ms(6_000) + calm_after() * 4,
        true,
        tiny,
    );
    assert!(verdict.ratio.is_some_and(|r| r > 1.5), "{verdict:?}");
    // Slow start never ended: nothing was ever over budget.
    assert!(
        controller.rate() > START_RATE * 4.0,
        "{}",
        controller.rate()
    );
}

#[test]
fn over_budget_cuts_the_pace_within_two_spans() {
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let (now, _) = run(&mut controller, ms(0), ms(10_000), true, linear);
    let before = controller.rate();
    // Production suffers badly now, whatever we do. The span under way when it starts
    // may hold too few slow canaries to tell; slow canaries on and on are harm, and a
    // median over budget cuts on a full span.
    let (_, verdict) = run(&mut controller, now, CUT_AFTER * 2 + ms(100), true, |_| {
        ms(20)
    });
    assert!(
        controller.rate() <= before * CUT_FACTOR,
        "{before} → {}",
        controller.rate()
    );
    assert!(verdict.ratio.is_some_and(|r| r > 5.0));
}

#[test]
fn a_cut_by_a_noisy_burst_is_won_back_step_by_step() {
    let settings = ImpactSettings {
        floor: ms(1),
        ..rest_only_at_start()
    };
    let mut controller = ImpactController::new(settings, ms(0));
    // Production never notices us (a light load on a primary with room to spare).
    let flat = |_: Option<ImpactDirective>| ms(2);
    let (now, _) = run(&mut controller, ms(0), ms(30_000), true, flat);
    let before = controller.rate();
    // Noisy seconds: the canary is slow whatever we do. One burst is one cut, and a
    // second only after a full span at the cut pace.
    let (now, _) = run(&mut controller, now, CUT_AFTER + ms(100), true, |_| ms(20));
    let cut = controller.rate();
    assert!(cut <= before * CUT_FACTOR + 1e-9, "{before} → {cut}");
    assert!(
        cut >= before * CUT_FACTOR * CUT_FACTOR * 0.5,
        "{before} → {cut}"
    );
    // Back at the old pace step by step, each on the canaries that show calm (×1.5 to
    // 85 % of the last cut, a tenth more to it, ×1.5 past it): six steps at most.
    let (now, _) = run(&mut controller, now, calm_after() * 6 + ms(100), true, flat);
    assert!(
        controller.rate() >= before - 1e-9,
        "{before} → {cut} → {}",
        controller.rate()
    );
    // ... and past it, multiplying again: that cut was noise.
    let back = controller.rate();
    run(&mut controller, now, calm_after() * 2 + ms(100), true, flat);
    assert!(
        controller.rate() >= back * 2.0,
        "{back} → {}",
        controller.rate()
    );
}

#[test]
fn under_a_hockey_stick_it_spends_most_seconds_under_the_knee() {
    let settings = ImpactSettings {
        floor: ms(1),
        ..rest_only_at_start()
    };
    let mut controller = ImpactController::new(settings, ms(0));
    // Production does not notice us up to 3 000 rows/s, then suffers badly.
    let hockey = |d: Option<ImpactDirective>| match d {
        Some(ImpactDirective::Pace(rate)) if rate > 3_000.0 => ms(10),
        _ => ms(2),
    };
    let (mut now, _) = run(&mut controller, ms(0), ms(60_000), true, hockey);
    let mut rates = Vec::new();
    for _ in 0..60 {
        let (next, verdict) = run(&mut controller, now, GROW_AFTER, true, hockey);
        now = next;
        if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
            rates.push(rate);
        }
    }
    let over = rates.iter().filter(|r| **r > 3_000.0).count();
    let mean = rates.iter().sum::<f64>() / rates.len() as f64;
    // Back to 85 % of the last cut at once, then a tenth more a judgement: over the
    // knee about one judgement in four, not every other one.
    assert!(
        over * 10 <= rates.len() * 3,
        "{over} of {}: {rates:?}",
        rates.len()
    );
    assert!(mean >= 3_000.0 * 0.75, "mean {mean}: {rates:?}");
}

#[test]
fn two_scattered_slow_canaries_hold_the_pace_and_three_cut_it() {
    let settings = ImpactSettings {
        floor: ms(1),
        ..ImpactSettings::default()
    };
    let (mut controller, now, rate) = right_after_a_step(settings);
    let flat = |_: Option<ImpactDirective>| ms(2);
    let grown = controller.rate();
    assert!(grown > rate * 1.4, "{rate} → {grown}: a multiplying step");
    // Two slow canaries a second apart: not enough to say harm, nor calm yet; the pace
    // holds.
    let (now, _) = run(&mut controller, now, CUT_AFTER, true, every(20, 2));
    assert_eq!(
        controller.rate(),
        grown,
        "two scattered slow canaries moved the pace"
    );
    // Many calm canaries later, it grows again (the three slow canaries below come right
    // after that step, so that they are all the evidence the test has).
    let mut now = now;
    let regrow_by = now + calm_after() * 2;
    while controller.rate() == grown {
        (now, _) = run(&mut controller, now, CANARY, true, flat);
        assert!(now < regrow_by, "no growth in {:?}", calm_after() * 2);
    }
    let regrown = controller.rate();
    assert!(regrown > grown, "{grown} → {regrown}");
    // Three slow canaries a second apart right after a multiplying step: harm, and the
    // step is undone.
    assert!(
        regrown > grown * 1.4,
        "{grown} → {regrown}: a multiplying step"
    );
    run(&mut controller, now, ms(3_100), true, every(20, 3));
    assert!(
        (controller.rate() - grown).abs() < 1e-9,
        "{grown} → {regrown} → {}",
        controller.rate()
    );
}

#[test]
fn a_doubling_into_a_cliff_is_undone_within_a_second() {
    // Production does not notice us up to 3 000 rows/s, then suffers badly: slow start
    // doubles 500 → 1 000 → 2 000 → 4 000, over the cliff (issue 19's frontier: 15,000 →
    // 29,000 rows/s next to 200 tx/s, production's p99 from 4 to 150 ms).
    let cliff = |d: Option<ImpactDirective>| match d {
        Some(ImpactDirective::Pace(rate)) if rate > 3_000.0 => ms(10),
        _ => ms(2),
    };
    // No periodic rest on the way up: one falling in the step over the cliff would delay
    // the verdict by its length.
    let settings = rest_only_at_start();
    let mut controller = ImpactController::new(settings, ms(0));
    let (mut now, mut before) = (ms(0), controller.rate());
    while controller.rate() <= 3_000.0 {
        before = controller.rate();
        (now, _) = run(&mut controller, now, CANARY, true, cliff);
        // The first rest, then three doublings of slow start.
        assert!(
            now < ms(6_000) + calm_after() * 4,
            "never reached the cliff"
        );
    }
    let over_since = now;
    let over = controller.rate();
    while controller.rate() == over {
        (now, _) = run(&mut controller, now, CANARY, true, cliff);
        assert!(now < over_since + CUT_AFTER, "no cut within a span");
    }
    // Judged on a second of canaries, not five, and back to the pace before the doubling
    // (a cut by CUT_FACTOR would stay over the cliff).
    assert!(
        now - over_since <= DECIDED_AFTER + CANARY,
        "{:?} at {over} rows/s",
        now - over_since
    );
    assert_eq!(controller.rate(), before, "{over} → {}", controller.rate());
}

#[test]
fn a_doubling_just_past_the_knee_is_undone_within_two_calm_times_across_a_rest() {
    // Issue 19's twelfth round, next to 200 tx/s: slow start doubled 2 000 → 4 000 rows/s,
    // just past the knee, where a canary in seventy was over the line; Wald's test
    // decides neither way there for a long time, each periodic rest started it over, and
    // the pace stood 17–26 s before it came back. Here the knee is at 3 000 rows/s.
    let one_in_seventy = one_in_seventy();
    let past_the_knee = |directive: Option<ImpactDirective>| match directive {
        Some(ImpactDirective::Pace(rate)) if rate > 3_000.0 => one_in_seventy(directive),
        _ => ms(2),
    };
    // Periodic rests on, as shipped.
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let (mut now, mut before) = (ms(0), controller.rate());
    while controller.rate() <= 3_000.0 {
        before = controller.rate();
        (now, _) = run(&mut controller, now, CANARY, true, past_the_knee);
        assert!(now < ms(120_000), "never passed the knee");
    }
    let over_since = now;
    let over = controller.rate();
    let (mut rested, mut was_resting) = (Duration::ZERO, false);
    let mut verdict;
    while controller.rate() == over {
        (now, verdict) = run(&mut controller, now, CANARY, true, past_the_knee);
        let resting = verdict.directive == Some(ImpactDirective::Rest);
        if resting && !was_resting {
            rested += DRAIN + REST;
        }
        was_resting = resting;
        assert!(
            now < over_since + ms(60_000),
            "{over} rows/s, past the knee, stood a minute ({rested:?} of it resting)"
        );
    }
    // Two calm-times of canaries while paced, the rests between them not counted, and
    // the step undone, not cut by CUT_FACTOR (that would stay past the knee).
    assert!(rested > Duration::ZERO, "no rest fell in the step");
    assert!(
        now - over_since <= calm_after() * PROBATION_CALM_TIMES + rested + ms(500),
        "{over} rows/s stood {:?}, {rested:?} of it resting",
        now - over_since
    );
    assert_eq!(controller.rate(), before, "{over} → {}", controller.rate());
}

#[test]
fn a_step_with_the_calm_share_over_the_line_proves_itself_within_its_probation() {
    // The probation must not undo a step that is calm by the test's own definition: two
    // slow canaries right at its start (0.5 % of the probation's canaries, the worst
    // place for them) leave it just enough calm canaries to show calm in time.
    let (mut controller, mut now, _) = right_after_a_step(ImpactSettings::default());
    let stepped = controller.rate();
    let probation = CANARY * (PROBATION_CALM_TIMES * Evidence::canaries_to_calm());
    let slow_at_start = every(5, 2);
    let until = now + probation + CANARY * 2;
    while controller.rate() == stepped {
        (now, _) = run(&mut controller, now, CANARY, true, &slow_at_start);
        assert!(
            now < until,
            "neither grew nor was undone within the probation"
        );
    }
    assert!(
        controller.rate() > stepped,
        "{stepped} → {}: undone, though calm",
        controller.rate()
    );
}

#[test]
fn a_cut_pace_is_cut_again_only_on_a_full_span() {
    // After a cut, the canaries are judged on a full span again: production slow
    // whatever we do costs one cut in five seconds, not one a second.
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let (mut now, _) = run(&mut controller, ms(0), ms(10_000), true, linear);
    let before = controller.rate();
    let slow_since = now;
    while controller.rate() == before {
        (now, _) = run(&mut controller, now, CANARY, true, |_| ms(20));
        assert!(now < slow_since + CUT_AFTER * 2 + ms(100), "no cut");
    }
    let cut = controller.rate();
    assert!(cut < before, "{before} → {cut}");
    run(&mut controller, now, CUT_AFTER - CANARY * 2, true, |_| {
        ms(20)
    });
    assert_eq!(
        controller.rate(),
        cut,
        "{before} → {cut} → {}",
        controller.rate()
    );
}

#[test]
fn a_stall_of_the_disk_is_one_episode_and_scattered_slow_canaries_are_harm() {
    // Issue 19's fourth round: the disk stalls a commit every few seconds with or without
    // a backfill, and one span's tail over budget cut the pace, again and again, to
    // 50–300 rows/s. Canaries over the line in a row are one episode: a stall holding
    // three of them is one event, three scattered ones are three.
    let (mut controller, now, _) = right_after_a_step(ImpactSettings::default());
    let grown = controller.rate();
    // A stall holding three canaries in a row: the pace holds.
    let mut stalled = controller.clone();
    run(&mut stalled, now, CUT_AFTER, true, stalls(3));
    assert_eq!(stalled.rate(), grown, "one stall of the disk cut the pace");
    // Three canaries as slow, scattered over three seconds: harm, a cut.
    run(&mut controller, now, CUT_AFTER, true, every(20, 3));
    assert!(controller.rate() < grown, "{grown} → {}", controller.rate());
    // A canary slow on and on is harm too, however long its run.
    let mut slow = stalled.clone();
    let before = slow.rate();
    run(&mut slow, now + CUT_AFTER, CUT_AFTER, true, stalls(1_000));
    assert!(slow.rate() < before, "{before} → {}", slow.rate());
}

/// A pace `controller` set: since when, the rate, and why.
type Pace = (Duration, f64, Option<PaceChange>);

/// The paces `controller` (periodic rests off) sets over `span` from the start, in
/// order, while jobs reaching at most `capacity` rows/s run.
fn paces(
    controller: &mut ImpactController,
    span: Duration,
    capacity: f64,
    latency: impl Fn(Option<ImpactDirective>) -> Duration,
) -> Vec<Pace> {
    let (mut now, mut paces) = (ms(0), vec![(ms(0), controller.rate(), None)]);
    while now < span {
        (now, _) = run_jobs_reaching(controller, now, CANARY, true, capacity, &latency);
        if paces
            .last()
            .is_some_and(|(_, rate, _)| *rate != controller.rate())
        {
            paces.push((now, controller.rate(), controller.last_change()));
        }
    }
    paces
}

/// Asserts that every pace at or below `floor` in `paces` that a lower one followed
/// stood at least two full spans and was cut on confirmed harm: one reading of the tail
/// there is held by the floor, only a second one cuts. Returns how many did.
fn held_then_cut(paces: &[Pace], floor: f64) -> usize {
    let below: Vec<_> = paces
        .windows(2)
        .filter(|pair| pair[0].1 <= floor + 1e-9 && pair[1].1 < pair[0].1)
        .collect();
    for pair in &below {
        let (stood, rate) = (pair[1].0 - pair[0].0, pair[0].1);
        assert!(
            stood >= 2 * CUT_AFTER && pair[1].2 == Some(PaceChange::TailHarmConfirmed),
            "{rate} rows/s was cut after {stood:?}, not on a second reading: {paces:?}"
        );
    }
    below.len()
}

#[test]
fn one_reading_of_the_tail_never_cuts_below_the_floor_a_second_at_the_same_pace_does() {
    // Issue 19's eleventh round: two early readings of the tail cut the pace from 500 to
    // 245 rows/s next to 200 tx/s, below what the old duty cycle ran within budget, and
    // it never climbed back in the two minutes measured. Its thirteenth round: on a slower
    // machine next to 600 tx/s that floor held the pace at 500 rows/s at 1.18–1.80×
    // production's p99, while the canaries showed harm again and again. Here one canary
    // in thirty is slow while the jobs run, scattered: Wald's test sees harm at every
    // pace, the median and the p95 see none.
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    let paces = paces(
        &mut controller,
        ms(120_000),
        f64::INFINITY,
        every_while_paced(30),
    );
    assert!(
        paces.iter().any(|(_, rate, _)| *rate == TAIL_FLOOR_RATE),
        "jobs that achieve the pace: the floor is 500: {paces:?}"
    );
    assert!(
        held_then_cut(&paces, TAIL_FLOOR_RATE) >= 2,
        "harm shown again and again never cut below the floor: {paces:?}"
    );

    // Production's typical transaction slower with every row we write (2 ms plus 10 ms per
    // 1 000 rows/s): the median over budget cuts below the floor at once, towards the 60
    // rows/s the budget allows.
    let steep = |d: Option<ImpactDirective>| match d {
        Some(ImpactDirective::Pace(rate)) => ms(2) + Duration::from_secs_f64(rate / 1e5),
        _ => ms(2),
    };
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    run(&mut controller, ms(0), ms(60_000), true, steep);
    assert!(
        controller.rate() < TAIL_FLOOR_RATE / 2.0,
        "{}",
        controller.rate()
    );
}

#[test]
fn harm_on_one_reading_at_the_floor_then_calm_never_cuts_below_it() {
    // One canary in thirty slow above the floor; at it, one in twenty for the first 110
    // canaries (harm on one full span, not broad), calm after that: the floor holds that
    // one reading, and nothing confirms it.
    let (seen, at_floor) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    let latency = |d: Option<ImpactDirective>| {
        let slow = match d {
            Some(ImpactDirective::Pace(rate)) if rate > TAIL_FLOOR_RATE => {
                seen.set(seen.get() + 1);
                seen.get().is_multiple_of(30)
            }
            Some(ImpactDirective::Pace(_)) => {
                at_floor.set(at_floor.get() + 1);
                at_floor.get() <= 110 && at_floor.get().is_multiple_of(20)
            }
            _ => false,
        };
        if slow {
            ms(20)
        } else {
            ms(2)
        }
    };
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    let (mut now, mut held) = (ms(0), false);
    let mut lowest = f64::INFINITY;
    while now < ms(120_000) {
        (now, _) = run(&mut controller, now, CANARY, true, latency);
        held |= controller.floor_held_at.is_some();
        lowest = lowest.min(controller.rate());
    }
    assert!(held, "the floor never held a cut: the test shows nothing");
    assert_eq!(lowest, TAIL_FLOOR_RATE);
}

#[test]
fn a_cut_the_floor_held_is_a_decision_though_the_pace_stands() {
    // Issue 19's fourteenth round: the impact log printed only a changed pace, so a cut
    // the tail's floor held (the pace unchanged) showed nowhere until the next change.
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    let latency = every_while_paced(30);
    let mut now = ms(0);
    while now < ms(120_000) {
        let (decisions, rate) = (controller.decisions(), controller.rate());
        (now, _) = run(&mut controller, now, CANARY, true, &latency);
        if controller.floor_held_at.is_some() {
            assert_eq!(controller.rate(), rate, "the floor held no cut");
            assert_eq!(controller.decisions(), decisions + 1);
            assert_eq!(controller.last_change(), Some(PaceChange::TailHarm));
            return;
        }
    }
    panic!("the floor never held a cut in two minutes: the test shows nothing");
}

#[test]
fn for_jobs_slower_than_the_floor_the_tail_still_cuts_to_half_what_they_achieve() {
    // Jobs that reach 200 rows/s flat out (a heavy statement): with the floor at 500 rows/s
    // no pace the tail could set would bind them. One canary in thirty slow while they run:
    // one reading cuts no lower than 100 rows/s, half what they achieve.
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    let paces = paces(&mut controller, ms(120_000), 200.0, every_while_paced(30));
    assert!(
        paces.iter().any(|(_, rate, _)| *rate < 200.0),
        "the tail never bound the jobs: {paces:?}"
    );
    let first_below = paces.iter().position(|(_, rate, _)| *rate < 100.0 - 1e-9);
    assert!(
        first_below.is_some_and(|at| (paces[at - 1].1 - 100.0).abs() < 1e-9),
        "the pace did not stand at half what they achieved, then go below it: {paces:?}"
    );
    held_then_cut(&paces, 100.0);
}

#[test]
fn a_baseline_that_learned_the_stalls_still_cuts_when_the_median_rises() {
    // Issue 19's fourth round: a rest whose p98 caught the disk's stalls (44.6 ms) set a
    // tail nothing reached, and the pace doubled unopposed to 154,847 rows/s. The median
    // (production's typical transaction) still shows the load.
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let seen = std::cell::Cell::new(0u32);
    // One canary in twenty stalls 40 ms; the others take 2 ms plus 1 ms per 1 000
    // rows/s we write.
    let stalling = |d: Option<ImpactDirective>| {
        seen.set(seen.get() + 1);
        if seen.get().is_multiple_of(20) {
            ms(40)
        } else {
            linear(d)
        }
    };
    let mut now = ms(0);
    let mut highest: f64 = 0.0;
    while now < ms(60_000) {
        (now, _) = run(&mut controller, now, CANARY, true, stalling);
        highest = highest.max(controller.rate());
    }
    let baseline = controller.baseline().expect("a baseline");
    assert!(
        baseline >= ms(40),
        "{baseline:?}: the tail learned the stalls"
    );
    // The median's budget is a 0.6 ms rise (1.3 × 2 ms): 600 rows/s under `stalling`.
    // Slow start's one doubling past it is undone; then additive steps creep about it.
    assert!(highest <= 1_000.0 + 1e-9, "highest pace {highest}");
    assert!(controller.rate() <= 700.0, "{}", controller.rate());
}

#[test]
fn a_rest_slower_than_the_calmest_span_after_it_is_trusted_only_as_far_as_that_span() {
    // Issue 19's fifth round: a first rest read a p98 of 8.9 ms (a stall, or the daemon's
    // own start-up), spans paced at 1,000 rows/s right after it 0.9 ms, and slow start
    // doubled unopposed to 41,000 rows/s next to 200 tx/s.
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    // Production at 1 ms plus 0.5 ms per 1 000 rows/s we write; every canary of the
    // first rest at 9 ms.
    let polluted_rest = |d: Option<ImpactDirective>| match d {
        Some(ImpactDirective::Pace(rate)) => ms(1) + Duration::from_secs_f64(rate / 2e6),
        _ => ms(9),
    };
    let (mut now, mut highest) = (ms(0), 0.0_f64);
    while now < ms(29_000) {
        (now, _) = run(&mut controller, now, CANARY, true, polluted_rest);
        highest = highest.max(controller.rate());
    }
    assert!(
        controller.baseline().is_some_and(|b| b < ms(2)),
        "{:?}",
        controller.baseline()
    );
    // Judged against 1.5 ms (the span at the first pace, 1 000 rows/s), the budget's
    // line is 2 ms: 2 000 rows/s, and one additive step past it is cut; against the
    // rest's 9 ms it would be 21 400.
    assert!(highest <= 3_000.0, "highest pace {highest}");
}

#[test]
fn the_calmest_span_counts_only_until_the_next_rest() {
    // Production itself turns slower (its own load): the calmest span before it is stale,
    // and the pace, cut for it, climbs back once a rest has learned the new level
    // (every 30 s by default).
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let (now, _) = run(&mut controller, ms(0), ms(25_000), true, linear);
    let slower = |d: Option<ImpactDirective>| linear(d) + ms(3);
    let (now, _) = run(&mut controller, now, ms(10_000), true, slower);
    let cut = controller.rate();
    // The next rest is due at 30 s and lasts 2.3 s; then the climb back from the cut
    // pace: ×1.5 up to near the last cut, creeping past it, ×1.5 again once the rise
    // leaves room (a rest every 30 s resets the evidence it climbs on).
    run(
        &mut controller,
        now,
        ms(30_000) + calm_after() * 6,
        true,
        slower,
    );
    // At 5 ms the budget allows a 1.5 ms rise: 1 500 rows/s.
    assert!(
        controller.rate() >= 1_000.0,
        "{cut} → {} after a rest at 5 ms",
        controller.rate()
    );
    assert!(
        controller.baseline().is_some_and(|b| b >= ms(5)),
        "{:?}",
        controller.baseline()
    );
}

#[test]
fn near_the_budget_growth_turns_additive() {
    let settings = ImpactSettings {
        floor: ms(1),
        ..rest_only_at_start()
    };
    let mut controller = ImpactController::new(settings, ms(0));
    // Under `linear` the budget (a 1 ms rise) is 1 000 rows/s and "room" (half that
    // rise) 500 rows/s: from above 500 rows/s every growth step is a tenth of the pace
    // (at least MIN_GROWTH).
    let (mut now, _) = run(&mut controller, ms(0), ms(30_000), true, linear);
    for _ in 0..20 {
        let before = controller.rate();
        let (next, _) = run(&mut controller, now, GROW_AFTER, true, linear);
        now = next;
        let after = controller.rate();
        if after > before && before > 500.0 {
            assert!(
                after <= before + (before * GROWTH_FRACTION).max(MIN_GROWTH) + 1e-9,
                "{before} → {after}"
            );
        }
    }
}

#[test]
fn the_best_case_adds_the_climb_and_the_rests_to_the_flat_out_time() {
    let settings = ImpactSettings::default();
    assert_eq!(
        ImpactController::best_case_seconds(&settings, CANARY, 0.0, 1e4),
        0.0
    );
    assert_eq!(
        ImpactController::best_case_seconds(&settings, CANARY, 1e6, 0.0),
        0.0
    );
    let flat_out = 1e7 / 1e4;
    let best = ImpactController::best_case_seconds(&settings, CANARY, 1e7, 1e4);
    // A rest of 2.3 s in every 30 s (8 %), a first one of 5.3 s, and a climb from
    // 1,000 rows/s of four doublings, each on the canaries that show calm (about ten
    // seconds at 50 ms): about 39 s, in which 150,000 rows (15 s flat out) are written.
    let step = (CANARY * Evidence::canaries_to_calm()).as_secs_f64();
    let climb = 4.0 * step - 15.0 * step / 10.0;
    let rests = flat_out * (DRAIN + REST).as_secs_f64() / (30.0 - (DRAIN + REST).as_secs_f64());
    assert!(best > flat_out + rests + climb, "{best}");
    assert!(best < flat_out + rests + climb + 10.0, "{best}");
    // A job smaller than the first step is done in it, at 1,000 rows/s.
    let small = ImpactController::best_case_seconds(&settings, CANARY, 1_500.0, 1e4);
    assert!(
        (small - ((DRAIN + FIRST_REST).as_secs_f64() + 1.5)).abs() < 1e-9,
        "{small}"
    );
}

/// The default settings, re-learning the baseline every `period`.
fn relearning_every(period: Duration) -> ImpactSettings {
    ImpactSettings {
        relearn_every: period,
        ..ImpactSettings::default()
    }
}

#[test]
fn it_rests_again_every_relearn_interval_and_when_production_starts() {
    let settings = relearning_every(Duration::from_secs(10));
    let mut controller = ImpactController::new(settings, ms(0));
    let mut rests = 0;
    let mut now = ms(0);
    let mut resting = false;
    while now < Duration::from_secs(39) {
        let (next, verdict) = run(&mut controller, now, CANARY, true, linear);
        now = next;
        let rest = verdict.directive == Some(ImpactDirective::Rest);
        if rest && !resting {
            rests += 1;
            assert!(
                rests == 1 || now.as_millis().is_multiple_of(10_000),
                "a periodic rest at {now:?}"
            );
        }
        resting = rest;
    }
    assert_eq!(rests, 4, "the first rest and one every 10 s since");
    // Production stopping and starting again: a rest at once.
    run(&mut controller, now, ms(100), false, linear);
    let verdict = controller.evaluate(now + ms(150), true);
    assert_eq!(verdict.directive, Some(ImpactDirective::Rest));
}

#[test]
fn without_production_the_pace_is_not_judged() {
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let (now, _) = run(&mut controller, ms(0), ms(4_000), true, linear);
    let before = controller.rate();
    // Jobs run flat out while production is away: their canaries would cut the pace
    // (or, quiet, double it) for nothing.
    run(&mut controller, now, ms(10_000), false, |_| ms(50));
    assert_eq!(controller.rate(), before);
}

#[test]
fn a_silent_canary_is_no_signal() {
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let (now, _) = run(&mut controller, ms(0), ms(4_000), true, linear);
    assert!(controller.evaluate(now, true).directive.is_some());
    assert_eq!(
        controller.evaluate(now + SIGNAL_TIMEOUT, true).directive,
        None
    );
    // Never a canary at all: no signal either.
    let mut blind = ImpactController::new(ImpactSettings::default(), ms(0));
    assert_eq!(blind.evaluate(ms(5_000), true).directive, None);
}

#[test]
fn the_pace_stays_within_twice_what_the_jobs_achieve() {
    let mut controller = ImpactController::new(ImpactSettings::default(), ms(0));
    let mut now = ms(0);
    let mut verdict = controller.evaluate(now, true);
    // The jobs manage only 1 000 rows/s, and production never notices.
    let mut rows = 0u64;
    while now < Duration::from_secs(40) {
        now += CANARY;
        if matches!(verdict.directive, Some(ImpactDirective::Pace(_))) {
            rows += 50;
        }
        controller.observe(now, ms(2));
        controller.record_rows(now, rows);
        verdict = controller.evaluate(now, true);
    }
    assert!(controller.rate() <= 2_000.0 * 1.01, "{}", controller.rate());
}

#[test]
fn nonsense_settings_fall_back_to_the_defaults() {
    let controller = ImpactController::new(
        ImpactSettings {
            budget_ratio: f64::NAN,
            floor: Duration::ZERO,
            relearn_every: Duration::ZERO,
            excess_share: 0.0,
            wal_rise: f64::NAN,
            sli_window: Duration::ZERO,
        },
        ms(0),
    );
    assert_eq!(controller.settings.budget_ratio, 1.3);
    assert_eq!(controller.settings.relearn_every, Duration::from_secs(30));
    assert_eq!(controller.settings.wal_rise, 0.0, "NaN: not judged");
}

#[test]
fn quantiles_use_the_nearest_rank() {
    let mut values: Vec<f64> = (1..=10).map(f64::from).collect();
    assert_eq!(quantile(&mut values, 0.9), Some(9.0));
    assert_eq!(quantile(&mut [3.0], 0.9), Some(3.0));
    assert_eq!(quantile(&mut [], 0.9), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the canaries say (and whenever they are silent), the pace stays
    /// within [MIN_RATE, MAX_RATE], never grows more than twofold in one judgement,
    /// and every over-budget judgement leaves it no higher than before.
    #[test]
    fn the_pace_stays_bounded_and_moves_by_bounded_steps(
        latencies in proptest::collection::vec(proptest::option::of(0u64..50_000), 1..400),
        ratio in 1.01f64..3.0,
        floor_us in 0u64..5_000,
        excess_share in prop_oneof![Just(0.0), 0.0005f64..0.01],
        wal_rise in prop_oneof![Just(0.0), 1.01f64..2.0],
        wal_waits in proptest::collection::vec((0u32..20, 0u32..20), 400),
        in_batch in proptest::collection::vec(0u64..50_000, 400),
        busy in 0.0f64..1.0,
        sli_window_ms in prop_oneof![Just(0u64), 2_000u64..20_000],
        sli in proptest::collection::vec(proptest::option::of(0u64..50_000), 400),
    ) {
        let settings = ImpactSettings {
            budget_ratio: ratio,
            floor: Duration::from_micros(floor_us),
            relearn_every: Duration::from_secs(7),
            excess_share,
            wal_rise,
            sli_window: ms(sli_window_ms),
        };
        let mut controller = ImpactController::new(settings, ms(0));
        let mut now = ms(0);
        let mut rows = 0u64;
        for (((latency, inside_us), (waiting, active)), sli_us) in
            latencies.into_iter().zip(in_batch).zip(wal_waits).zip(sli)
        {
            now += CANARY;
            let before = controller.rate();
            if let Some(us) = latency {
                controller.observe(now, Duration::from_micros(us));
            }
            controller.observe_wal_waits(now, WalWaitCount { waiting, active });
            controller.observe_in_batch(now, Duration::from_micros(inside_us));
            if let Some(us) = sli_us {
                controller.observe_sli(now, us as f64 / 1e6);
            }
            controller.record_busy(now, now.mul_f64(busy));
            rows += 10;
            controller.record_rows(now, rows);
            let verdict = controller.evaluate(now, true);
            let after = controller.rate();
            prop_assert!((MIN_RATE..=MAX_RATE).contains(&after));
            prop_assert!(after <= (before * 2.0).max(START_RATE) + 1e-9);
            if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
                prop_assert_eq!(rate, after);
            }
            if let Some(r) = verdict.ratio {
                prop_assert!(r.is_finite() && r >= 0.0);
            }
        }
    }
}

#[test]
fn a_pace_that_slows_one_canary_in_seventy_is_never_grown() {
    // Issue 19's seventh round: next to 600 tx/s a pace past the frontier put 1–2 % of
    // production's transactions over the line, and a test that allowed a false growth one
    // time in five grew on the first hundred canaries that happened to hold no slow one.
    // Here the slow canaries come after gaps of 120 and then 25 calm ones: 1.4 %.
    let (mut controller, mut now, _) = right_after_a_step(ImpactSettings::default());
    let paced = controller.rate();
    let gaps = one_in_seventy();
    let mut highest = paced;
    let until = now + ms(60_000);
    while now < until {
        (now, _) = run(&mut controller, now, CANARY, true, &gaps);
        highest = highest.max(controller.rate());
    }
    assert!(
        highest <= paced,
        "grew from {paced} to {highest} rows/s at 1.4 % over the line"
    );
}

/// The excess judge on, at `excess_share`, with periodic rests off.
fn judging_excess(excess_share: f64) -> ImpactSettings {
    ImpactSettings {
        excess_share,
        ..rest_only_at_start()
    }
}

/// Drives `controller` from `from` for `span` as [`run`] does with periodic canaries,
/// every `slow_anywhere_every`-th of them (0: none) stalling 20 ms and the others taking
/// 2 ms, and with a canary inside a batch every 100 ms, every `slow_inside_every`-th
/// stalling alike. The batches are in flight `busy` of the time. Returns the time
/// reached and the highest pace seen.
fn run_with_batches(
    controller: &mut ImpactController,
    from: Duration,
    span: Duration,
    busy: f64,
    [slow_anywhere_every, slow_inside_every]: [u32; 2],
) -> (Duration, f64) {
    let mut now = from;
    let mut highest = controller.rate();
    let (mut inside, mut anywhere) = (0u32, 0u32);
    while now < from + span {
        anywhere += 1;
        let slow = slow_anywhere_every > 0 && anywhere.is_multiple_of(slow_anywhere_every);
        (now, _) = run(controller, now, CANARY, true, |_| {
            if slow {
                ms(20)
            } else {
                ms(2)
            }
        });
        if (now.as_millis() / CANARY.as_millis()).is_multiple_of(2) {
            inside += 1;
            let slow = slow_inside_every > 0 && inside.is_multiple_of(slow_inside_every);
            controller.observe_in_batch(now, if slow { ms(20) } else { ms(2) });
        }
        controller.record_busy(now, now.mul_f64(busy));
        highest = highest.max(controller.rate());
    }
    (now, highest)
}

#[test]
fn the_batches_own_share_cuts_where_the_canaries_anywhere_see_calm() {
    // Issue 19's ninth round: production's slow transactions fall inside the batches,
    // where a canary at its own interval lands one time in twenty-five. Inside, one canary
    // in five is slow; the batches run 5 % of the time: they add 1 % of slow
    // transactions, four times the 0.25 % allowed.
    let mut judged = ImpactController::new(judging_excess(0.0025), ms(0));
    let (_, highest) = run_with_batches(&mut judged, ms(0), ms(60_000), 0.05, [0, 5]);
    assert!(
        highest <= START_RATE && judged.rate() < START_RATE,
        "never grown, and cut: highest {highest}, now {} rows/s",
        judged.rate()
    );
    let excess = judged.excess().expect("judged");
    assert!(
        excess.inside_share > 0.15 && excess.busy_share > 0.04,
        "{excess:?}"
    );

    // The same canaries with the excess judge off: the canaries at their own interval
    // are flat, and the pace climbs.
    let mut blind = ImpactController::new(judging_excess(0.0), ms(0));
    let (_, highest) = run_with_batches(&mut blind, ms(0), ms(60_000), 0.05, [0, 5]);
    assert!(highest >= 4.0 * START_RATE, "{highest}");
    assert_eq!(blind.excess(), None, "not judged while off");
}

#[test]
fn the_batches_own_share_well_within_budget_lets_the_pace_climb() {
    // One canary in fifty slow inside batches that run 2 % of the time: 0.04 % added.
    let mut judged = ImpactController::new(judging_excess(0.0025), ms(0));
    let (_, highest) = run_with_batches(&mut judged, ms(0), ms(60_000), 0.02, [0, 50]);
    assert!(highest >= 4.0 * START_RATE, "{highest}");
    let excess = judged.excess().expect("judged");
    assert!(excess.high <= 0.0025, "{excess:?}");
}

#[test]
fn without_canaries_inside_batches_the_excess_judge_holds_the_pace() {
    // No evidence that the batches are within budget: the pace neither grows nor is cut.
    let mut judged = ImpactController::new(judging_excess(0.0025), ms(0));
    let mut now = ms(0);
    let mut highest = judged.rate();
    while now < ms(60_000) {
        (now, _) = run(&mut judged, now, CANARY, true, |_| ms(2));
        judged.record_busy(now, now.mul_f64(0.05));
        highest = highest.max(judged.rate());
    }
    assert_eq!(highest, START_RATE);
    assert_eq!(judged.rate(), START_RATE);
}

#[test]
fn with_the_excess_judge_the_disks_own_stalls_do_not_hold_the_pace_back() {
    // One canary in sixty slow wherever it is timed, inside batches or not: the disk's
    // own stalls, which the batches do not add to. Wald's test over the canaries anywhere
    // sees harm in them (1.7 % is nearer its 2 % than its 0.5 %); the excess judge sees
    // none of it as the batches'.
    let mut judged = ImpactController::new(judging_excess(0.0025), ms(0));
    let (_, highest) = run_with_batches(&mut judged, ms(0), ms(90_000), 0.03, [60, 60]);
    assert!(highest >= 4.0 * START_RATE, "{highest}");

    let mut blind = ImpactController::new(judging_excess(0.0), ms(0));
    let (_, highest) = run_with_batches(&mut blind, ms(0), ms(90_000), 0.03, [60, 60]);
    assert!(highest <= START_RATE, "{highest}");
}

/// Drives `controller` from `from` for `span` with flat 2 ms canaries every 50 ms and, in
/// between, a sample of ten production sessions every 25 ms of which `waiting(pace)` wait
/// on the WAL (the pace in force; `None` at rest). Returns the time reached and the last
/// verdict, and each pace decision with the pace it set.
fn run_with_wal_waits(
    controller: &mut ImpactController,
    from: Duration,
    span: Duration,
    waiting: impl Fn(Option<f64>) -> u32,
) -> (Duration, ImpactVerdict, Vec<(f64, PaceChange)>) {
    let mut now = from;
    let mut verdict = controller.evaluate(now, true);
    let mut rows = 0.0;
    let mut changes: Vec<(f64, PaceChange)> = Vec::new();
    while now < from + span {
        let pace = match verdict.directive {
            Some(ImpactDirective::Pace(rate)) => Some(rate),
            _ => None,
        };
        controller.observe_wal_waits(
            now + CANARY / 2,
            WalWaitCount {
                waiting: waiting(pace),
                active: 10,
            },
        );
        now += CANARY;
        rows += pace.unwrap_or(0.0) * CANARY.as_secs_f64();
        controller.observe(now, ms(2));
        controller.record_rows(now, rows as u64);
        verdict = controller.evaluate(now, true);
        let decision = controller
            .last_change()
            .map(|change| (controller.rate(), change));
        if let Some(decision) = decision.filter(|decision| changes.last() != Some(decision)) {
            changes.push(decision);
        }
    }
    (now, verdict, changes)
}

/// The WAL judge on at a 15 % rise, with periodic rests off.
fn judging_wal_waits() -> ImpactSettings {
    ImpactSettings {
        wal_rise: 1.15,
        ..rest_only_at_start()
    }
}

#[test]
fn production_waiting_on_the_wal_more_than_at_rest_cuts_though_the_canaries_are_calm() {
    // Six in ten production sessions wait on the WAL at rest; above 1,500 rows/s eight do.
    // The canaries never move: only the WAL judge can tell the pace is over budget.
    let waits = |pace: Option<f64>| {
        if pace.is_some_and(|rate| rate > 1_500.0) {
            8
        } else {
            6
        }
    };
    let mut controller = ImpactController::new(judging_wal_waits(), ms(0));
    let (now, _, _) = run_with_wal_waits(&mut controller, ms(0), Duration::from_secs(60), waits);
    assert_eq!(controller.last_change(), Some(PaceChange::WalHarm));
    assert!(
        controller.rate() <= 1_500.0 / CUT_FACTOR,
        "still at {} rows/s",
        controller.rate()
    );
    // Without the judge the calm canaries grow the pace on and on.
    let mut blind = ImpactController::new(rest_only_at_start(), ms(0));
    run_with_wal_waits(&mut blind, ms(0), now - ms(0), waits);
    assert!(
        blind.rate() > 4.0 * controller.rate(),
        "{} rows/s",
        blind.rate()
    );
}

#[test]
fn production_waiting_on_the_wal_as_at_rest_lets_the_pace_grow() {
    let mut controller = ImpactController::new(judging_wal_waits(), ms(0));
    run_with_wal_waits(&mut controller, ms(0), Duration::from_secs(60), |_| 6);
    assert!(
        controller.rate() > 4.0 * START_RATE,
        "{} rows/s",
        controller.rate()
    );
    assert_eq!(controller.last_change(), Some(PaceChange::Calm));
}

#[test]
fn a_doubling_production_waits_on_the_wal_for_is_undone_in_the_wal_judges_name() {
    // Six in ten production sessions wait on the WAL at rest and at the starting pace;
    // eight once the pace has doubled. The canaries never move, so the log must say it
    // was the WAL judge that undid the step, not the tail.
    let waits = |pace: Option<f64>| {
        if pace.is_some_and(|rate| rate > START_RATE) {
            8
        } else {
            6
        }
    };
    let mut controller = ImpactController::new(judging_wal_waits(), ms(0));
    let (_, _, changes) =
        run_with_wal_waits(&mut controller, ms(0), Duration::from_secs(30), waits);
    let undone = changes
        .iter()
        .position(|(_, change)| *change == PaceChange::StepWalHarmed);
    let Some(undone) = undone else {
        panic!("no step undone by the WAL judge: {changes:?}");
    };
    assert!(
        changes
            .iter()
            .all(|(_, change)| *change != PaceChange::StepHarmed),
        "{changes:?}"
    );
    // Undone to the pace it stepped from, which production's WAL waits allow.
    assert_eq!(changes[undone].0, START_RATE, "{changes:?}");
}

/// Two daemons (pods of one Kubernetes Job) next to one production, the second started
/// `later` than the first: each daemon's controller runs on its own clock (time since
/// its own start), `align` tells it the wall clock as the daemon does. Production's
/// canaries are 2 ms plus 1 ms per 1,000 rows/s both daemons write. Returns both
/// baselines after `span`, and every rest's start on the wall clock, per daemon.
fn two_daemons(
    later: Duration,
    span: Duration,
    align: bool,
) -> [(Option<Duration>, Vec<Duration>); 2] {
    const WALL_AT_FIRST_START: Duration = Duration::from_secs(1_764_000_000);
    let starts = [WALL_AT_FIRST_START, WALL_AT_FIRST_START + later];
    let mut controllers: [Option<ImpactController>; 2] = [None, None];
    let mut paces = [0.0f64; 2];
    let mut resting = [false; 2];
    let mut rests: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut wall = WALL_AT_FIRST_START;
    while wall < WALL_AT_FIRST_START + span {
        let latency = ms(2) + Duration::from_secs_f64((paces[0] + paces[1]) / 1e6);
        for daemon in 0..2 {
            if wall < starts[daemon] {
                continue;
            }
            let now = wall - starts[daemon];
            let controller = controllers[daemon].get_or_insert_with(|| {
                let controller = ImpactController::new(ImpactSettings::default(), now);
                if align {
                    controller.resting_on_the_wall_clock(now, wall)
                } else {
                    controller
                }
            });
            controller.observe(now, latency);
            let verdict = controller.evaluate(now, true);
            let rest = verdict.directive == Some(ImpactDirective::Rest);
            if rest && !resting[daemon] {
                rests[daemon].push(wall);
            }
            resting[daemon] = rest;
            paces[daemon] = match verdict.directive {
                Some(ImpactDirective::Pace(rate)) => rate,
                _ => 0.0,
            };
        }
        wall += CANARY;
    }
    let [first, second] = controllers;
    let [first_rests, second_rests] = rests;
    [
        (first.and_then(|c| c.baseline()), first_rests),
        (second.and_then(|c| c.baseline()), second_rests),
    ]
}

#[test]
fn daemons_on_one_wall_clock_rest_together_and_learn_production_alone() {
    // The second pod starts 13.37 s after the first: uncoordinated, each rested while
    // the other's batches ran, and learned a baseline with them in it.
    let [(first, first_rests), (second, second_rests)] =
        two_daemons(ms(13_370), Duration::from_secs(150), true);
    for (baseline, daemon) in [(first, "first"), (second, "second")] {
        assert_eq!(baseline, Some(ms(2)), "the {daemon} daemon's baseline");
    }
    // Every periodic rest of one is a rest of the other, at the same moment: the first
    // rests (at each start) are their own.
    assert!(first_rests.len() >= 5, "{first_rests:?}");
    assert_eq!(first_rests[1..], second_rests[1..], "rest starts");
    for start in &first_rests[1..] {
        assert!(start.as_secs().is_multiple_of(30), "{start:?}");
    }
    // Each on its own clock, the same two daemons learn each other's batches.
    let [(first, _), (second, _)] = two_daemons(ms(13_370), Duration::from_secs(150), false);
    assert!(
        first > Some(ms(2)) || second > Some(ms(2)),
        "{first:?} {second:?}"
    );
}

#[test]
fn a_rest_production_began_just_before_a_periodic_moment_restarts_at_it() {
    let settings = relearning_every(Duration::from_secs(10));
    // Wall clock at the controller's zero: 3 s past a multiple of 10 s.
    let mut controller = ImpactController::new(settings, ms(0))
        .resting_on_the_wall_clock(ms(0), Duration::from_secs(1_764_000_003));
    let (now, verdict) = run(&mut controller, ms(0), ms(5_500), true, linear);
    assert!(matches!(verdict.directive, Some(ImpactDirective::Pace(_))));
    let begun = controller.rests_begun();
    // Production stops, and starts again 1 s before the periodic moment (7 s here): a
    // rest at once, restarted at the moment, ending with the other daemons'.
    let (now, _) = run(&mut controller, now, ms(5_950) - now, false, linear);
    let (now, verdict) = run(&mut controller, now, ms(50), true, linear);
    assert_eq!(verdict.directive, Some(ImpactDirective::Rest));
    assert_eq!(controller.rests_begun(), begun + 1);
    let (now, verdict) = run(&mut controller, now, ms(7_000) - now, true, linear);
    assert_eq!(verdict.directive, Some(ImpactDirective::Rest));
    assert_eq!(controller.rests_begun(), begun + 2, "restarted at {now:?}");
    let resting_until = ms(7_000) + DRAIN + REST;
    let (now, verdict) = run(
        &mut controller,
        now,
        resting_until - ms(50) - now,
        true,
        linear,
    );
    assert_eq!(verdict.directive, Some(ImpactDirective::Rest), "at {now:?}");
    let (_, verdict) = run(&mut controller, now, ms(100), true, linear);
    assert!(matches!(verdict.directive, Some(ImpactDirective::Pace(_))));
    assert_eq!(controller.rests_begun(), begun + 2);
}

/// The default settings, periodic rests off, production's SLI read with a 5 s window.
fn reading_the_sli() -> ImpactSettings {
    ImpactSettings {
        sli_window: ms(5_000),
        ..rest_only_at_start()
    }
}

/// As [`run`], and production's SLI read every [`sli::SLI_READ_EVERY`]: `sli(now, rate)`
/// from the pace in force (0 while resting). Returns the time reached and every pace set.
fn run_reading_the_sli(
    controller: &mut ImpactController,
    from: Duration,
    span: Duration,
    latency: impl Fn(Option<ImpactDirective>) -> Duration,
    mut sli: impl FnMut(Duration, f64) -> f64,
) -> (Duration, Vec<f64>) {
    let mut now = from;
    let mut verdict = controller.evaluate(now, true);
    let mut paces = Vec::new();
    let mut next_read = from;
    while now < from + span {
        now += CANARY;
        controller.observe(now, latency(verdict.directive));
        let rate = match verdict.directive {
            Some(ImpactDirective::Pace(rate)) => rate,
            _ => 0.0,
        };
        if now >= next_read {
            controller.observe_sli(now, sli(now, rate));
            next_read = now + sli::SLI_READ_EVERY;
        }
        verdict = controller.evaluate(now, true);
        if let Some(ImpactDirective::Pace(rate)) = verdict.directive {
            if paces.last() != Some(&rate) {
                paces.push(rate);
            }
        }
    }
    (now, paces)
}

/// A controller reading the SLI ([`reading_the_sli`]) run on calm canaries and a flat 3 ms
/// SLI until the SLI has proven a pace (the pace in force), and the time reached.
fn with_a_pace_proven() -> (ImpactController, Duration) {
    let calm = |_: Option<ImpactDirective>| ms(2);
    let mut controller = ImpactController::new(reading_the_sli(), ms(0));
    let mut now = ms(0);
    while controller.sli().and_then(|sli| sli.proven).is_none() {
        assert!(now < ms(60_000), "nothing proven in a minute");
        (now, _) = run_reading_the_sli(&mut controller, now, ms(1_000), calm, |_, _| 0.003);
    }
    (controller, now)
}

#[test]
fn with_the_sli_the_first_rest_lasts_its_window_and_learns_its_baseline() {
    let mut controller = ImpactController::new(reading_the_sli(), ms(0));
    let flat = |_: Option<ImpactDirective>| ms(2);
    // Without the SLI the first rest ends after DRAIN + FIRST_REST (5.3 s); with a 5 s
    // window after DRAIN + 5 s + two readings' time (7.3 s).
    let (now, paces) = run_reading_the_sli(&mut controller, ms(0), ms(7_000), flat, |_, _| 0.003);
    assert!(paces.is_empty(), "paced at {now:?}: {paces:?}");
    let (_, paces) = run_reading_the_sli(&mut controller, now, ms(1_000), flat, |_, _| 0.003);
    assert_eq!(paces, [START_RATE]);
    assert_eq!(controller.sli().and_then(|sli| sli.baseline), Some(0.003));
}

#[test]
fn a_pace_production_s_own_latency_shows_within_budget_holds_against_the_canaries() {
    // Canaries at 2 ms until the SLI proves a pace, then every one at 20 ms: harm to the
    // canaries, none to production.
    let calm = |_: Option<ImpactDirective>| ms(2);
    let slow = |_: Option<ImpactDirective>| ms(20);
    let (mut controller, now) = with_a_pace_proven();
    let proven = controller.rate();
    let harmful_after = now;
    let (now, paces) = run_reading_the_sli(&mut controller, now, ms(30_000), slow, |_, _| 0.003);
    assert!(
        paces.iter().all(|rate| *rate >= proven),
        "the canaries cut below the proven {proven}: {paces:?}"
    );
    // Production's own latency over budget (6 ms against 3): a step the SLI gave and has
    // not proven is cut back, no lower than the pace it proved; over budget at that pace
    // says production has moved: a long rest, not a cut (a stall of the disk does this).
    let highest_proven = controller.sli().and_then(|sli| sli.proven).expect("proven");
    let (begun, from) = (controller.rests_begun(), now);
    let mut now = now;
    while controller.last_change() != Some(PaceChange::SliOwnRise) {
        assert!(
            now < from + ms(60_000),
            "never taken for production's own rise"
        );
        assert!(
            controller.rate() >= highest_proven,
            "cut below {highest_proven}"
        );
        (now, _) = run_reading_the_sli(&mut controller, now, ms(100), slow, |_, _| 0.006);
    }
    assert_eq!(controller.rests_begun(), begun + 1);
    assert_eq!(controller.rate(), highest_proven);

    // The same canaries without the SLI cut below that pace: the floor above is the SLI's.
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    let (now, _) = run(&mut controller, ms(0), harmful_after, true, calm);
    let (_, paces) = run_reading_the_sli(&mut controller, now, ms(30_000), slow, |_, _| 0.003);
    assert!(paces.iter().any(|rate| *rate < proven), "{paces:?}");
}

#[test]
fn production_s_own_latency_over_budget_cuts_what_the_canaries_call_calm() {
    // The canaries never move; production's p99 is 3 ms up to 1,000 rows/s and 2.25 ms
    // more per 1,000 rows/s above: over budget (1.3×, 0.9 ms) past 1,400 rows/s, with
    // room (under 0.45 ms) to 1,200.
    let flat = |_: Option<ImpactDirective>| ms(2);
    let production = |rate: f64| 0.003 + (rate - START_RATE).max(0.0) * 2.25e-6;
    let mut controller = ImpactController::new(reading_the_sli(), ms(0));
    let (_, paces) = run_reading_the_sli(&mut controller, ms(0), ms(120_000), flat, |_, rate| {
        production(rate)
    });
    let first_over = paces
        .iter()
        .position(|rate| *rate > 1_400.0)
        .expect("grows past the budget once");
    let harmed = paces[first_over];
    assert!(
        paces[first_over + 1..].iter().all(|rate| *rate < harmed),
        "grew back to a pace the SLI showed over budget: {paces:?}"
    );
    let last = *paces.last().expect("paced");
    assert!(
        (START_RATE..=1_400.0).contains(&last),
        "settles within budget: {paces:?}"
    );
    let sli = controller.sli().expect("the SLI is read");
    assert!(sli.harmed.is_some_and(|h| h > 1_400.0), "{sli:?}");
    // Proven only where production's p99 had room: up to 3.45 ms, 1,200 rows/s.
    assert!(
        sli.proven
            .is_some_and(|proven| (START_RATE..=1_200.0).contains(&proven)),
        "{sli:?}"
    );
}

#[test]
fn a_rise_of_production_s_own_is_relearned_not_cut_to_nothing() {
    let calm = |_: Option<ImpactDirective>| ms(2);
    let (mut controller, now) = with_a_pace_proven();
    let proven = controller.sli().and_then(|sli| sli.proven).expect("proven");
    let begun = controller.rests_begun();
    // Production's own load doubles its p99 whatever the pace.
    let (_, paces) = run_reading_the_sli(&mut controller, now, ms(120_000), calm, |_, _| 0.006);
    let lowest = paces.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        lowest >= proven * 0.3,
        "cut to {lowest} from {proven}: {paces:?}"
    );
    // The rest after the rise at the proven pace joins the baselines' median, which the
    // old 3 ms still holds; the next rise, at half the pace first over, replaces them.
    assert_eq!(
        controller.rests_begun(),
        begun + 2,
        "two long rests re-learned it"
    );
    assert_eq!(controller.sli().and_then(|sli| sli.baseline), Some(0.006));
    assert!(
        controller.rate() > lowest,
        "never grew again after re-learning: {paces:?}"
    );
}

#[test]
fn production_s_p99_with_room_grows_the_pace_the_canaries_would_hold_down() {
    // One canary in thirty slow while paced: the canaries' tail shows harm at every pace.
    // Production's p99 is 3 ms up to 3,000 rows/s and 1 ms more per 1,000 rows/s above:
    // over budget (1.3×, 0.9 ms) past 3,900 rows/s, with room (under 0.45 ms) to 3,450.
    let production = |rate: f64| 0.003 + (rate - 3_000.0).max(0.0) / 1e6;
    let mut controller = ImpactController::new(reading_the_sli(), ms(0));
    let (_, paces) = run_reading_the_sli(
        &mut controller,
        ms(0),
        ms(180_000),
        every_while_paced(30),
        |_, rate| production(rate),
    );
    let highest = paces.iter().copied().fold(0.0, f64::max);
    assert!(
        (3_900.0..=5_100.0).contains(&highest),
        "grew to {highest}, one step past the budget at most: {paces:?}"
    );
    let last = controller.rate();
    assert!(
        (3_000.0..=3_900.0).contains(&last),
        "settles within budget near its edge, at {last}: {paces:?}"
    );

    // The same without the SLI: the canaries hold it at their floor.
    let mut controller = ImpactController::new(rest_only_at_start(), ms(0));
    run(
        &mut controller,
        ms(0),
        ms(180_000),
        true,
        every_while_paced(30),
    );
    assert!(
        controller.rate() <= TAIL_FLOOR_RATE,
        "{}",
        controller.rate()
    );
}

#[test]
fn a_range_that_holds_a_short_rest_proves_no_pace() {
    // Periodic rests every 30 s, a 5 s window. Production's p99 is 6 ms, twice its 3 ms
    // baseline, at any pace; only a range that still holds some of a rest reads 3 ms.
    let settings = ImpactSettings {
        sli_window: ms(5_000),
        ..ImpactSettings::default()
    };
    let mut controller = ImpactController::new(settings, ms(0));
    let calm = |_: Option<ImpactDirective>| ms(2);
    let mut last_rest = Duration::ZERO;
    let mut production = |now: Duration, rate: f64| {
        if rate == 0.0 {
            last_rest = now;
        }
        if now < last_rest + ms(5_000) {
            0.003
        } else {
            0.006
        }
    };
    let mut now = ms(0);
    let mut sli_harm = false;
    while now < ms(120_000) {
        (now, _) = run_reading_the_sli(&mut controller, now, ms(100), calm, &mut production);
        sli_harm |= controller.last_change() == Some(PaceChange::SliHarm);
        let proven = controller.sli().and_then(|sli| sli.proven);
        assert_eq!(proven, None, "proved a pace at {now:?}");
    }
    assert!(sli_harm, "production's p99 over budget never cut the pace");
}

#[test]
fn a_long_rest_longer_than_relearn_every_still_ends() {
    // The SLI's window (40 s) outlasts the periodic rests' period (30 s): the periodic
    // moments inside the long rest at 600 s (the first of its ten minutes) must not
    // restart it.
    let settings = ImpactSettings {
        sli_window: ms(40_000),
        ..ImpactSettings::default()
    };
    let mut controller = ImpactController::new(settings, ms(0));
    let flat = |_: Option<ImpactDirective>| ms(2);
    let (now, _) = run_reading_the_sli(&mut controller, ms(0), ms(599_000), flat, |_, _| 0.003);
    let begun = controller.rests_begun();
    let (_, verdict) = run(&mut controller, now, ms(1_100), true, flat);
    assert_eq!(
        verdict.directive,
        Some(ImpactDirective::Rest),
        "the long rest at 600 s"
    );
    let (_, paces) =
        run_reading_the_sli(&mut controller, ms(600_100), ms(60_000), flat, |_, _| 0.003);
    assert!(
        !paces.is_empty(),
        "never paced again after the long rest at 600 s"
    );
    // The long rest, and the short ones at 660 s at most: none restarted.
    assert!(
        controller.rests_begun() <= begun + 2,
        "{} rests",
        controller.rests_begun() - begun
    );
}
