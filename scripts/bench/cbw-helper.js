#!/usr/bin/env node
// JSON plumbing for scripts/bench/cbw (plain Node, no dependencies):
//
//   record KEY=VALUE...          print one JSON line describing a run. Values
//                                that look like numbers become numbers. Keys
//                                with a file behind them:
//                                  fio=FILE       fio --output-format=json
//                                  iopslog=FILE   fio --write_iops_log file
//                                  st0= st1= final= start=FILE  nbd-cbw status JSON
//                                  profile=DIR    .cpuprofile files: top self time
//                                  profileWindow=FROM_US:TO_US  only samples in it
//                                  ns0= ns1=      wall clock ns -> seconds
//   get FILE PATH                print a field (dotted path) of a JSON file
//   report RUNS.jsonl OUT.json [--partial]   print the tables, write OUT.json
//   profile-top DIR [N] [FROM_US:TO_US]  top self-time functions of .cpuprofile files

'use strict';
const fs = require('node:fs');
const path = require('node:path');

const MiB = 1024 * 1024;

function readJson(file) {
  try {
    const text = fs.readFileSync(file, 'utf8').trim();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch {
      // several JSON lines (backup wait --json): the last one
      const lines = text.split('\n').filter((l) => l.trim());
      return JSON.parse(lines[lines.length - 1]);
    }
  } catch {
    return null;
  }
}

function fioSummary(file) {
  const j = readJson(file);
  const w = j?.jobs?.[0]?.write;
  if (!w) return null;
  const clat = w.clat_ns ?? {};
  const pct = clat.percentile ?? {};
  return {
    iops: w.iops,
    ios: w.total_ios,
    runtimeMs: j.jobs[0].job_runtime ?? w.runtime,
    bwMiBs: w.bw_bytes / MiB,
    clatMeanUs: clat.mean / 1000,
    clatP50Us: (pct['50.000000'] ?? NaN) / 1000,
    clatP99Us: (pct['99.000000'] ?? NaN) / 1000,
    clatP999Us: (pct['99.900000'] ?? NaN) / 1000,
    clatMaxUs: clat.max / 1000,
    errors: j.jobs[0].error ?? 0,
  };
}

/** Per-second IOPS from a fio iops log written with --log_avg_msec=1000. */
function iopsLog(file) {
  let text;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  const out = [];
  for (const line of text.split('\n')) {
    const f = line.split(',').map((s) => s.trim());
    if (f.length < 2 || f[0] === '') continue;
    out.push(Number(f[1]));
  }
  return out;
}

/**
 * Self time by function in the .cpuprofile files of DIR. Native and Node
 * internal leaves (writev, Buffer copies) are named with the first nbd-cbw
 * (dist/) frame that called them. With a window [fromUs, toUs] on the
 * profiler's clock (process.hrtime, microseconds), only samples inside it
 * count; `busyPct` is the main thread's non-idle share of sampled time.
 */
function profileTop(dir, n = 15, window = null) {
  let files;
  try {
    files = fs.readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'));
  } catch {
    return null;
  }
  if (files.length === 0) return null;
  const short = (cf) => (cf.url ? cf.url.replace(/^file:\/\//, '').replace(/^.*\/(dist|node_modules)\//, '$1/') : '');
  const label = (cf) => {
    const url = short(cf);
    return `${cf.functionName || '(anonymous)'}${url ? ` ${url}:${cf.lineNumber + 1}` : ''}`;
  };
  const self = new Map();
  let total = 0;
  let idle = 0;
  for (const f of files) {
    const p = readJson(path.join(dir, f));
    if (!p?.nodes) continue;
    const byId = new Map(p.nodes.map((node) => [node.id, node]));
    const parent = new Map();
    for (const node of p.nodes) for (const c of node.children ?? []) parent.set(c, node.id);
    const samples = p.samples ?? [];
    const deltas = p.timeDeltas ?? [];
    let t = p.startTime;
    for (let i = 0; i < samples.length; i++) {
      t += deltas[i] ?? 0;
      const us = i + 1 < deltas.length ? deltas[i + 1] : 0;
      if (window && (t < window[0] || t > window[1])) continue;
      const node = byId.get(samples[i]);
      if (!node) continue;
      let key = label(node.callFrame);
      if (!node.callFrame.url.includes('/dist/')) {
        for (let m = byId.get(parent.get(node.id)); m; m = byId.get(parent.get(m.id))) {
          if (m.callFrame.url.includes('/dist/')) {
            key += `  <- ${label(m.callFrame)}`;
            break;
          }
        }
      }
      if (node.callFrame.functionName === '(idle)') idle += us;
      self.set(key, (self.get(key) ?? 0) + us);
      total += us;
    }
  }
  const top = [...self.entries()]
    .sort((a, b) => b[1] - a[1])
    .slice(0, n)
    .map(([fn, us]) => ({ fn, ms: Math.round(us / 1000), pct: total ? Math.round((1000 * us) / total) / 10 : 0 }));
  return {
    dir,
    files,
    window: window ? { fromUs: window[0], toUs: window[1] } : null,
    totalMs: Math.round(total / 1000),
    busyPct: total ? Math.round((1000 * (total - idle)) / total) / 10 : 0,
    top,
  };
}

function autoValue(v) {
  if (v === '') return null;
  if (v === 'true') return true;
  if (v === 'false') return false;
  if (v !== '' && /^-?\d+(\.\d+)?([eE][-+]?\d+)?$/.test(v)) return Number(v);
  return v;
}

function record(args) {
  const r = {};
  for (const a of args) {
    const i = a.indexOf('=');
    if (i < 0) continue;
    const k = a.slice(0, i);
    const v = a.slice(i + 1);
    if (k === 'fio') r.fio = fioSummary(v);
    else if (k === 'iopslog') r.iopsPerSecond = iopsLog(v);
    else if (['st0', 'st1', 'final', 'start'].includes(k)) r[k] = readJson(v);
    else if (k === 'profile') r.profileDir = v;
    else if (k === 'profileWindow') r.profileWindow = v ? v.split(':').map(Number) : null;
    else r[k] = autoValue(v);
  }
  if (r.profileDir !== undefined) {
    r.profile = r.profileDir ? profileTop(r.profileDir, 15, r.profileWindow?.length === 2 ? r.profileWindow : null) : null;
    delete r.profileDir;
    delete r.profileWindow;
  }
  if (typeof r.ns0 === 'number' && typeof r.ns1 === 'number') {
    r.seconds = (r.ns1 - r.ns0) / 1e9;
    delete r.ns0;
    delete r.ns1;
  }
  if (r.st0 && r.st1) {
    r.copiedInWindow = r.st1.bytesCopied - r.st0.bytesCopied;
    r.doneInWindow = r.st1.bytesDone - r.st0.bytesDone;
  }
  if (r.st1) {
    r.runningAtEnd = r.st1.state === 'running';
    r.bufferHighWater = r.st1.bufferHighWater;
    r.spillBytes = r.st1.spillBytes;
  }
  if (r.final?.startedAt && r.final?.finishedAt) {
    r.jobSeconds = (Date.parse(r.final.finishedAt) - Date.parse(r.final.startedAt)) / 1000;
  }
  if (r.iopsPerSecond?.length) {
    const first = r.iopsPerSecond.slice(0, 3);
    r.iopsFirst3s = first.reduce((s, x) => s + x, 0) / first.length;
  }
  if (typeof r.cpuTicks === 'number' && typeof r.clkTck === 'number') r.cbwCpuSeconds = r.cpuTicks / r.clkTck;
  if (typeof r.stealTicks === 'number' && typeof r.clkTck === 'number') r.stealSeconds = r.stealTicks / r.clkTck;
  process.stdout.write(JSON.stringify(r) + '\n');
}

function get(file, dotted) {
  let v = readJson(file);
  for (const k of dotted.split('.')) v = v == null ? undefined : v[k];
  if (v === undefined || v === null) return;
  process.stdout.write((typeof v === 'object' ? JSON.stringify(v) : String(v)) + '\n');
}

// ------------------------------------------------------------------ report

const mean = (xs) => {
  const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x));
  return v.length ? v.reduce((s, x) => s + x, 0) / v.length : NaN;
};
const fmt = (x, d = 0) => (typeof x === 'number' && Number.isFinite(x) ? x.toFixed(d) : '-');
const mib = (b) => (typeof b === 'number' && Number.isFinite(b) ? (b / MiB).toFixed(0) : '-');
const yn = (b) => (b === true ? 'yes' : b === false ? 'NO' : '-');

function table(headers, rows) {
  const all = [headers, ...rows].map((r) => r.map((c) => String(c)));
  const w = headers.map((_, i) => Math.max(...all.map((r) => (r[i] ?? '').length)));
  const line = (r) => r.map((c, i) => (i === 0 ? c.padEnd(w[i]) : c.padStart(w[i]))).join('  ');
  return [line(all[0]), w.map((n) => '-'.repeat(n)).join('  '), ...all.slice(1).map(line)].join('\n');
}

const A_LABEL = { direct: '(0) fio -> qemu-nbd direct', a: '(a) no backup', b: '(b) backup --buffer 0', c: '(c) backup --buffer 1G' };
const B_LABEL = { none: 'no backup', nospill: 'backup --buffer 256M', spill: 'backup --buffer 256M --spill-dir' };

function liveRows(runs, labels, baseline) {
  return runs.map((r) => {
    const base = baseline ? runs.find((x) => x.variant === baseline && x.rep === r.rep) : null;
    const ratio = base?.fio && r.fio ? r.fio.iops / base.fio.iops : NaN;
    return [
      labels[r.variant] ?? r.variant,
      r.rep,
      fmt(r.fio?.iops),
      fmt(r.iopsFirst3s),
      fmt(r.fio?.clatMeanUs),
      fmt(r.fio?.clatP99Us),
      fmt(ratio, 2),
      r.st1 ? yn(r.runningAtEnd) : '-',
      mib(r.copiedInWindow),
      mib(r.bufferHighWater),
      mib(r.spillBytes),
      fmt(r.cbwCpuSeconds, 1),
      mib(r.rssHwmKiB == null ? NaN : r.rssHwmKiB * 1024),
      fmt(r.load1, 1),
      r.verify ?? (r.error ? `ERROR: ${r.error}` : '-'),
    ];
  });
}

const LIVE_HEADERS = ['case', 'rep', 'IOPS', 'IOPS 0-3s', 'mean us', 'p99 us', 'vs base', 'running@end', 'copied MiB', 'buf peak MiB', 'spill MiB', 'cbw cpu s', 'cbw RSS MiB', 'load', 'verify'];

function report(runsFile, outFile, partial) {
  const lines = fs.existsSync(runsFile) ? fs.readFileSync(runsFile, 'utf8').split('\n').filter((l) => l.trim()) : [];
  const recs = lines.map((l) => {
    try {
      return JSON.parse(l);
    } catch {
      return null;
    }
  }).filter(Boolean);
  const meta = recs.find((r) => r.section === 'meta') ?? {};
  const out = { meta, partial: !!partial, sections: {} };
  const print = (s = '') => process.stdout.write(s + '\n');
  const verdicts = [];

  print('');
  print(`nbd-cbw benchmark  ${meta.date ?? ''}  ${meta.commit ?? ''}${meta.dirty ? ' (src has uncommitted changes)' : ''}`);
  print(`node ${meta.node ?? '?'}, ${meta.fioVersion ?? 'fio ?'}, ${meta.nbdkit ?? 'nbdkit ?'}, ${meta.qemuNbd ?? 'qemu-nbd ?'}, ${meta.nbdcopy ?? 'nbdcopy ?'}; ${meta.cpus ?? '?'} CPUs, ${meta.memGiB ?? '?'} GiB RAM`);
  print(`dist ${meta.dist ?? '?'} built ${meta.distBuilt ?? '?'}; load average at start ${meta.load1 ?? '?'} (the 'load' columns: 1-min load average when each run started; the machine is shared)`);
  if (meta.pageReporting) {
    print(`free page reporting: ${meta.pageReporting} (memory freed between runs may go back to the host; first touches of it then cost more: BENCHMARKS.md, ninth session)`);
  }
  if (meta.backupArgs) print(`extra backup start options: ${meta.backupArgs}`);
  if (partial) print('PARTIAL RESULTS: the run did not finish');

  // ---- A
  const A = recs.filter((r) => r.section === 'A');
  if (A.length) {
    print('');
    print(`A. fio 32k randwrite QD8, ${meta.seconds}s, 1 GiB random disk on /dev/shm (qemu-nbd) -> nbd-cbw; target nbdkit file${meta.targetPrealloc === 1 ? ' (allocated, BENCH_TARGET_PREALLOC=1)' : ''} + delay ${meta.targetDelay} + rate ${meta.targetRate} bit/s`);
    print(table(LIVE_HEADERS, liveRows(A, A_LABEL, 'a')));
    const m = (v) => mean(A.filter((r) => r.variant === v).map((r) => r.fio?.iops));
    const s = { meanIops: { a: m('a'), b: m('b'), c: m('c') } };
    s.ratioB = s.meanIops.b / s.meanIops.a;
    s.ratioC = s.meanIops.c / s.meanIops.a;
    s.allRunningAtEnd = A.filter((r) => r.variant === 'b' || r.variant === 'c').every((r) => r.runningAtEnd === true);
    s.verify = A.filter((r) => r.verify).map((r) => r.verify);
    print(`mean IOPS: (a) ${fmt(s.meanIops.a)}  (b) ${fmt(s.meanIops.b)}  (c) ${fmt(s.meanIops.c)};  (b)/(a) ${fmt(s.ratioB, 3)}  (c)/(a) ${fmt(s.ratioC, 3)}  [target (c)/(a) >= 0.90; QEMU seed 0.45]`);
    const pass = s.ratioC >= 0.9;
    verdicts.push(`A  (c)/(a) = ${fmt(s.ratioC, 3)}  ${Number.isFinite(s.ratioC) ? (pass ? 'PASS' : 'FAIL') : 'n/a'} (>= 0.90)`);
    if (!s.allRunningAtEnd) verdicts.push('A  WARNING: a backup was not running when fio ended: the window is not all under backup');
    for (const v of s.verify) if (v !== 'ok' && v !== '-') verdicts.push(`A  verify: ${v}`);
    printSeries(print, A, A_LABEL);
    out.sections.A = { runs: A, summary: s };
  }

  // ---- B
  const B = recs.filter((r) => r.section === 'B');
  if (B.length) {
    const setup = recs.find((r) => r.section === 'B-setup') ?? {};
    print('');
    print(`B. same fio on a 4 GiB random disk, --buffer 256M; source ${setup.sourceDir ?? '?'}, target ${setup.targetDir ?? '?'}, spill ${setup.spillDir ?? '?'}${meta.targetPrealloc === 1 ? ', target file allocated (BENCH_TARGET_PREALLOC=1)' : ''} (MemAvailable ${setup.memAvailableGiB ?? '?'} GiB at start)`);
    print(table(LIVE_HEADERS, liveRows(B, B_LABEL, 'none')));
    const m = (v, f) => mean(B.filter((r) => r.variant === v).map(f));
    const s = {
      meanIops: { none: m('none', (r) => r.fio?.iops), nospill: m('nospill', (r) => r.fio?.iops), spill: m('spill', (r) => r.fio?.iops) },
      allRunningAtEnd: B.filter((r) => r.variant === 'nospill' || r.variant === 'spill').every((r) => r.runningAtEnd === true),
      setup,
    };
    print(
      `mean IOPS: no backup ${fmt(s.meanIops.none)}  buffer only ${fmt(s.meanIops.nospill)} (${fmt(s.meanIops.nospill / s.meanIops.none, 2)})  ` +
        `buffer+spill ${fmt(s.meanIops.spill)} (${fmt(s.meanIops.spill / s.meanIops.none, 2)})`,
    );
    if (!s.allRunningAtEnd) verdicts.push('B  WARNING: a backup was not running when fio ended');
    printSeries(print, B, B_LABEL);
    out.sections.B = { runs: B, summary: s };
  }

  // ---- C
  const C = recs.filter((r) => r.section === 'C');
  if (C.length) {
    print('');
    print('C. full backup of a 1 GiB random disk (qemu-nbd on /dev/shm) to a fast target: nbd-cbw (backup start --wait) vs nbdcopy');
    print(
      table(
        ['tool', 'target', 'rep', 'wall s', 'job s', 'MiB/s', 'cbw cpu s', 'load', 'verify'],
        C.map((r) => [r.variant, r.target, r.rep, fmt(r.seconds, 2), fmt(r.jobSeconds, 2), fmt(1024 / r.seconds, 0), fmt(r.cbwCpuSeconds, 1), fmt(r.load1, 1), r.verify ?? (r.error ? `ERROR: ${r.error}` : '-')]),
      ),
    );
    const s = {};
    for (const t of [...new Set(C.map((r) => r.target))]) {
      const cbw = mean(C.filter((r) => r.target === t && r.variant === 'nbd-cbw').map((r) => r.seconds));
      const cp = mean(C.filter((r) => r.target === t && r.variant === 'nbdcopy').map((r) => r.seconds));
      s[t] = { cbwSeconds: cbw, nbdcopySeconds: cp, ratio: cp / cbw };
      print(`target ${t}: nbd-cbw ${fmt(cbw, 2)} s, nbdcopy ${fmt(cp, 2)} s, nbdcopy/nbd-cbw ${fmt(cp / cbw, 3)}  [target >= 0.90]`);
      verdicts.push(`C  ${t}: nbdcopy/nbd-cbw = ${fmt(cp / cbw, 3)}  ${Number.isFinite(cp / cbw) ? (cp / cbw >= 0.9 ? 'PASS' : 'FAIL') : 'n/a'} (>= 0.90)`);
    }
    for (const r of C) if (r.verify && r.verify !== 'ok') verdicts.push(`C  ${r.variant} ${r.target} rep ${r.rep}: verify ${r.verify}`);
    out.sections.C = { runs: C, summary: s };
  }

  // ---- D
  const D = recs.filter((r) => r.section === 'D');
  if (D.length) {
    print('');
    print('D. nbd-cbw full backup: 1 TiB sparse disk holding 1 GiB (16 x 64 MiB) vs a dense 1 GiB disk, fast target');
    print(
      table(
        ['disk', 'target', 'rep', 'wall s', 'job s', 'copied MiB', 'skipped GiB', 'cbw cpu s', 'load', 'verify'],
        D.map((r) => [
          r.variant,
          r.target,
          r.rep,
          fmt(r.seconds, 2),
          fmt(r.jobSeconds, 2),
          mib(r.final?.bytesCopied),
          fmt((r.final?.bytesSkipped ?? NaN) / 1024 / MiB, 0),
          fmt(r.cbwCpuSeconds, 1),
          fmt(r.load1, 1),
          r.verify ?? (r.error ? `ERROR: ${r.error}` : '-'),
        ]),
      ),
    );
    const s = {};
    for (const t of [...new Set(D.map((r) => r.target))]) {
      const sp = mean(D.filter((r) => r.target === t && r.variant === 'sparse-1T').map((r) => r.seconds));
      const de = mean(D.filter((r) => r.target === t && r.variant === 'dense-1G').map((r) => r.seconds));
      s[t] = { sparseSeconds: sp, denseSeconds: de, ratio: sp / de };
      print(`target ${t}: sparse ${fmt(sp, 2)} s, dense ${fmt(de, 2)} s, sparse/dense ${fmt(sp / de, 3)}  [target <= 1.2]`);
      verdicts.push(`D  ${t}: sparse/dense = ${fmt(sp / de, 3)}  ${Number.isFinite(sp / de) ? (sp / de <= 1.2 ? 'PASS' : 'FAIL') : 'n/a'} (<= 1.2)`);
    }
    for (const r of D) if (r.verify && r.verify !== 'ok') verdicts.push(`D  ${r.variant} ${r.target} rep ${r.rep}: verify ${r.verify}`);
    out.sections.D = { runs: D, summary: s };
  }

  const profiled = recs.filter((r) => r.profile?.top?.length);
  if (profiled.length) {
    print('');
    print('nbd-cbw CPU profiles (top self time):');
    for (const r of profiled) {
      const w = r.profile.window ? 'during the fio window' : 'whole process';
      print(`  ${r.section} ${r.variant} ${r.target ?? ''} rep ${r.rep}: ${r.profile.totalMs} ms sampled ${w}, main thread busy ${r.profile.busyPct}% (${r.profile.dir})`);
      for (const t of r.profile.top.slice(0, 10)) print(`    ${String(t.ms).padStart(7)} ms ${String(t.pct).padStart(5)}%  ${t.fn}`);
    }
  }

  const loads = recs.filter((r) => typeof r.load1 === 'number').map((r) => r.load1);
  const cpus = Number(meta.cpus) || 1;
  if (loads.length && Math.max(...loads) > cpus) {
    verdicts.push(
      `WARNING: the machine was busy (1-min load ${fmt(Math.min(...loads), 1)}-${fmt(Math.max(...loads), 1)} on ${cpus} CPUs): ` +
        'other work competed for CPU, figures are noisy; repeat with BENCH_REPEATS on a quiet machine',
    );
  }
  // CPU the host took (steal) during the measured windows: above 5 % of
  // their CPU time, say how much and where.
  const stealRuns = recs.filter((r) => typeof r.stealSeconds === 'number');
  const stolen = stealRuns.reduce((n, r) => n + r.stealSeconds, 0);
  const offered = stealRuns.reduce((n, r) => n + (r.windowSeconds ?? r.seconds ?? 0), 0) * cpus;
  if (offered > 0 && stolen > 0.05 * offered) {
    const worst = [...stealRuns]
      .sort((a, b) => b.stealSeconds - a.stealSeconds)
      .slice(0, 3)
      .map((r) => `${r.section} ${r.variant}${r.target ? ` ${r.target}` : ''} rep ${r.rep} ${fmt(r.stealSeconds, 1)} s`);
    verdicts.push(
      `WARNING: the host took ${fmt(stolen, 1)} s of CPU (steal) during the measured runs, ${fmt((100 * stolen) / offered, 1)} % ` +
        `of their CPU time (most: ${worst.join(', ')}): figures are noisy`,
    );
  }
  for (const r of recs.filter((x) => x.section === 'warning')) verdicts.push(`WARNING: ${r.text}`);
  const errors = recs.filter((r) => r.error && r.section !== 'warning');
  for (const r of errors) verdicts.push(`${r.section} ${r.variant} rep ${r.rep}: ERROR ${r.error}`);
  if (verdicts.length) {
    print('');
    print('Verdicts:');
    for (const v of verdicts) print(`  ${v}`);
  }
  out.verdicts = verdicts;
  fs.mkdirSync(path.dirname(outFile), { recursive: true });
  fs.writeFileSync(outFile, JSON.stringify(out, null, 2) + '\n');
  print('');
  print(`JSON: ${outFile}`);
}

function printSeries(print, runs, labels) {
  print('per-second IOPS:');
  for (const r of runs) {
    if (!r.iopsPerSecond?.length) continue;
    print(`  ${(labels[r.variant] ?? r.variant).padEnd(32)} rep ${r.rep}: ${r.iopsPerSecond.map((x) => fmt(x)).join(' ')}`);
  }
}

// ------------------------------------------------------------------- main

const [cmd, ...rest] = process.argv.slice(2);
switch (cmd) {
  case 'record':
    record(rest);
    break;
  case 'get':
    get(rest[0], rest[1]);
    break;
  case 'report':
    report(rest[0], rest[1], rest.includes('--partial'));
    break;
  case 'profile-top': {
    const p = profileTop(rest[0], Number(rest[1] ?? 20), rest[2] ? rest[2].split(':').map(Number) : null);
    if (!p) {
      console.error(`no .cpuprofile files in ${rest[0]}`);
      process.exit(1);
    }
    console.log(`${p.totalMs} ms sampled in ${p.files.join(', ')}, busy ${p.busyPct}%`);
    for (const t of p.top) console.log(`${String(t.ms).padStart(8)} ms ${String(t.pct).padStart(5)}%  ${t.fn}`);
    break;
  }
  default:
    console.error('usage: cbw-helper.js record|get|report|profile-top ...');
    process.exit(2);
}
