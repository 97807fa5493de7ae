// Keeps grafana/nbd-cbw-dashboard.json honest, against real processes.
//
// 1. Static: the dashboard's structure (Grafana 10 schema, panel types, the
//    datasource / instance / export variables), the provisioning files, the
//    example prometheus.yml (promtool check config), and every PromQL query
//    reduced to the metric names it uses.
// 2. Live exposition: a real `nbd-cbw serve --metrics 127.0.0.1:PORT` after
//    guest I/O and a backup: every metric the dashboard uses exists there with
//    a type that fits how it is queried (rate/increase on counters and
//    histogram series, deriv on gauges, histogram_quantile on _bucket).
// 3. Real Prometheus: two nbd-cbw processes scraped every second by a real
//    `prometheus`, one healthy under fio load with a backup whose target fails
//    writes for a moment (retries), one in trouble (a tiny cow buffer in front
//    of a target that takes 30 s per write: guest writes wait for buffer room,
//    time out and fail with EIO; then the job is cancelled). Every query of
//    every panel and every template variable query is then run against
//    Prometheus's HTTP API and must return data.
//
// Empty-result policy: the error, retry and failure counters have no series
// until their first event, so a query over them is legitimately empty on a
// healthy system. The test does not accept that: it makes every one of those
// events happen, so every query must return data. The one panel that shows
// totals ("Totals in the time range") appends `or vector(0)`, deliberately,
// so an operator sees 0 rather than "No data"; because the fallback would
// hide a misspelt metric, the test also runs the left-hand side of each such
// `or vector(0)` on its own and requires data from it too.
//
// Prometheus is required: when the `prometheus` binary is missing, the test
// fails and says how to install it (scripts/install-deps.sh does).

import t, { type Test } from 'tap';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import * as path from 'node:path';
import {
  MiB,
  NBD_CBW_BIN,
  REPO_ROOT,
  killProcess,
  makeImage,
  run,
  startNbdCbw,
  startNbdkit,
  tmpDir,
  waitFor,
} from './helpers/peers';

const DASHBOARD = path.join(REPO_ROOT, 'grafana', 'nbd-cbw-dashboard.json');
const PROM_EXAMPLE = path.join(REPO_ROOT, 'grafana', 'prometheus.yml');
const PROV_DATASOURCE = path.join(REPO_ROOT, 'grafana', 'provisioning', 'datasources', 'prometheus.yml');
const PROV_DASHBOARDS = path.join(REPO_ROOT, 'grafana', 'provisioning', 'dashboards', 'nbd-cbw.yml');

const INSTALL_HINT =
  'the `prometheus` binary is missing: install it (Debian: `apt-get install prometheus`; `bash scripts/install-deps.sh` does it)';

// ---------------------------------------------------------------- dashboard

interface Target {
  expr: string;
  refId: string;
  legendFormat?: string;
  datasource?: { type?: string; uid?: string };
}
interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos: { x: number; y: number; w: number; h: number };
  datasource?: { type?: string; uid?: string };
  targets?: Target[];
  panels?: Panel[];
}
interface Variable {
  name: string;
  type: string;
  query: string | { query: string };
  definition?: string;
  allValue?: string;
  includeAll?: boolean;
  datasource?: { type?: string; uid?: string };
}
interface Dashboard {
  schemaVersion: number;
  uid: string;
  title: string;
  panels: Panel[];
  templating: { list: Variable[] };
}

function loadDashboard(): Dashboard {
  return JSON.parse(fs.readFileSync(DASHBOARD, 'utf8')) as Dashboard;
}

/** Every panel, rows' nested panels included. */
function allPanels(d: Dashboard): Panel[] {
  const out: Panel[] = [];
  const walk = (ps: Panel[]) => {
    for (const p of ps) {
      out.push(p);
      if (p.panels) walk(p.panels);
    }
  };
  walk(d.panels);
  return out;
}

interface Query {
  panel: string;
  refId: string;
  expr: string;
}

function allQueries(d: Dashboard): Query[] {
  const out: Query[] = [];
  for (const p of allPanels(d)) for (const tg of p.targets ?? []) out.push({ panel: p.title, refId: tg.refId, expr: tg.expr });
  return out;
}

function variableQuery(v: Variable): string {
  return typeof v.query === 'string' ? v.query : v.query.query;
}

// ------------------------------------------------------------------ PromQL

const PROMQL_FUNCTIONS = new Set([
  // aggregation operators
  'sum', 'min', 'max', 'avg', 'group', 'stddev', 'stdvar', 'count', 'count_values', 'bottomk', 'topk', 'quantile',
  // functions
  'abs', 'absent', 'absent_over_time', 'ceil', 'changes', 'clamp', 'clamp_max', 'clamp_min', 'day_of_month',
  'day_of_week', 'day_of_year', 'days_in_month', 'delta', 'deriv', 'exp', 'floor', 'histogram_quantile',
  'holt_winters', 'hour', 'idelta', 'increase', 'irate', 'label_join', 'label_replace', 'ln', 'log2', 'log10',
  'minute', 'month', 'predict_linear', 'rate', 'resets', 'round', 'scalar', 'sgn', 'sort', 'sort_desc', 'sqrt',
  'time', 'timestamp', 'vector', 'year', 'avg_over_time', 'min_over_time', 'max_over_time', 'sum_over_time',
  'count_over_time', 'quantile_over_time', 'stddev_over_time', 'stdvar_over_time', 'last_over_time',
  'present_over_time',
]);
const PROMQL_KEYWORDS = new Set(['and', 'or', 'unless', 'bool', 'offset', 'inf', 'nan']);

/** The expression without strings, label matchers and range selectors (parentheses kept). */
function skeleton(expr: string): string {
  return expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
    .replace(/\{[^{}]*\}/g, '')
    .replace(/\[[^\]]*\]/g, '');
}

/** The metric names a PromQL expression reads, and the functions it calls. */
function parsePromql(expr: string): { metrics: string[]; functions: string[] } {
  const s = skeleton(expr)
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)/g, ' ')
    .replace(/\boffset\s+-?[\dsmhdwy]+/g, ' ');
  const metrics = new Set<string>();
  const functions = new Set<string>();
  const token = /[A-Za-z_:][\w:]*|\d*\.?\d+(?:[eE][+-]?\d+)?/g;
  for (let m = token.exec(s); m; m = token.exec(s)) {
    const w = m[0];
    if (/^[\d.]/.test(w)) continue;
    const rest = s.slice(m.index + w.length);
    if (PROMQL_KEYWORDS.has(w.toLowerCase())) continue;
    if (/^\s*\(/.test(rest)) functions.add(w);
    else metrics.add(w);
  }
  return { metrics: [...metrics], functions: [...functions] };
}

/** [function, metric] for each rate()/increase()/deriv()/... applied straight to a metric. */
function rangeFunctionUses(expr: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  const re = /\b(rate|irate|increase|deriv|delta|idelta|predict_linear)\s*\(\s*([A-Za-z_:][\w:]*)/g;
  const s = skeleton(expr);
  for (let m = re.exec(s); m; m = re.exec(s)) out.push([m[1], m[2]]);
  return out;
}

const GRAFANA_VARIABLES: Record<string, string> = {
  __rate_interval: '15s',
  __interval: '5s',
  __range: '5m',
};

/** What Grafana would send with "All" selected: $instance and $export become .* (their allValue). */
function substitute(expr: string, vars: Record<string, string>): string {
  return expr.replace(/\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]/g, (all, a: string, b: string, c: string) => {
    const name = a ?? b ?? c;
    const v = vars[name] ?? GRAFANA_VARIABLES[name];
    if (v === undefined) throw new Error(`unknown dashboard variable ${all} in: ${expr}`);
    return v;
  });
}

// ---------------------------------------------------------- the exposition

interface Exposition {
  /** Family name -> TYPE. */
  types: Map<string, string>;
  /** Sample name -> number of series. */
  samples: Map<string, number>;
}

function parseExposition(text: string): Exposition {
  const types = new Map<string, string>();
  const samples = new Map<string, number>();
  for (const line of text.split('\n')) {
    const ty = /^# TYPE (\S+) (\S+)/.exec(line);
    if (ty) types.set(ty[1], ty[2]);
    else if (line && !line.startsWith('#')) {
      const name = /^[A-Za-z_:][\w:]*/.exec(line)?.[0];
      if (name) samples.set(name, (samples.get(name) ?? 0) + 1);
    }
  }
  return { types, samples };
}

/** The family a sample name belongs to: itself, or a histogram/summary for _bucket/_sum/_count. */
function familyOf(exp: Exposition, name: string): { family: string; type: string } | null {
  const own = exp.types.get(name);
  if (own) return { family: name, type: own };
  const m = /^(.*)_(bucket|sum|count)$/.exec(name);
  if (m) {
    const t = exp.types.get(m[1]);
    if (t === 'histogram' || (t === 'summary' && m[2] !== 'bucket')) return { family: m[1], type: t };
  }
  return null;
}

// ------------------------------------------------------------------- I/O

function httpGet(
  where: { url: string } | { socketPath: string; path: string },
  timeoutMs = 5000,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    let opts: http.RequestOptions;
    if ('url' in where) {
      const u = new URL(where.url);
      opts = { hostname: u.hostname, port: u.port, path: `${u.pathname}${u.search}` };
    } else opts = { socketPath: where.socketPath, path: where.path, host: 'x' };
    const req = http.get({ ...opts, timeout: timeoutMs, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (d: Buffer) => chunks.push(d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${'url' in where ? where.url : where.path} timed out after ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

async function scrape(port: number): Promise<string> {
  const r = await httpGet({ url: `http://127.0.0.1:${port}/metrics` });
  if (r.status !== 200) throw new Error(`GET /metrics on port ${port}: ${r.status} ${r.body}`);
  return r.body;
}

/** A loopback port nothing listens on right now (bind port 0, read it, close). */
async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** One value of a sample line in Prometheus text, summed over series matching `labels`. */
function sampleSum(text: string, name: string, labels: Record<string, string> = {}): number {
  let sum = 0;
  for (const line of text.split('\n')) {
    const m = /^([A-Za-z_:][\w:]*)(\{[^}]*\})? (\S+)/.exec(line);
    if (!m || m[1] !== name) continue;
    const ls = m[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => ls.includes(`${k}="${v}"`))) sum += Number(m[3]);
  }
  return sum;
}

/** The nbd-cbw CLI, bounded; fails the test with the output when it fails. */
async function cli(args: string[], timeoutMs = 30_000): Promise<string> {
  const r = await run(process.execPath, [NBD_CBW_BIN, ...args], { timeoutMs, cwd: REPO_ROOT });
  if (r.code !== 0) throw new Error(`nbd-cbw ${args.join(' ')} failed:\n${r.describe()}`);
  return r.stdout;
}

/** A long-running helper process (prometheus, fio): output kept, killed at teardown. */
function spawnDaemon(t: Test, name: string, cmd: string, args: string[]): { proc: ChildProcess; output: () => string } {
  let out = '';
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: tmpDir(t) });
  const keep = (d: Buffer) => {
    out = (out + d.toString('utf8')).slice(-64 * 1024);
  };
  proc.stdout?.on('data', keep);
  proc.stderr?.on('data', keep);
  proc.on('error', (e) => {
    out += `\nspawn ${cmd} failed: ${e.message}`;
  });
  const lastResort = () => proc.kill('SIGKILL');
  process.once('exit', lastResort);
  t.teardown(async () => {
    if (!t.passing()) t.comment(`${name} output:\n${out.slice(-8000)}`);
    await killProcess(proc, 5000);
    process.off('exit', lastResort);
  });
  return { proc, output: () => out };
}

interface PromResult {
  status: string;
  error?: string;
  data?: { resultType: string; result: Array<{ metric: Record<string, string>; value: [number, string] }> };
}

async function promQuery(promPort: number, expr: string): Promise<PromResult> {
  const r = await httpGet({ url: `http://127.0.0.1:${promPort}/api/v1/query?query=${encodeURIComponent(expr)}` }, 10_000);
  return JSON.parse(r.body) as PromResult;
}

// ============================================================ 1. static

t.test('dashboard structure, provisioning files and the example prometheus.yml', async (t) => {
  const d = loadDashboard();
  t.ok(d.schemaVersion >= 36 && d.schemaVersion <= 39, `schemaVersion ${d.schemaVersion} is Grafana 10-era`);
  t.equal(d.uid, 'nbd-cbw');
  t.ok(d.title);

  const vars = new Map(d.templating.list.map((v) => [v.name, v]));
  const ds = vars.get('datasource');
  t.equal(ds?.type, 'datasource', 'a datasource variable');
  t.equal(ds && variableQuery(ds), 'prometheus', 'of Prometheus data sources');
  const inst = vars.get('instance');
  const exp = vars.get('export');
  t.equal(inst && variableQuery(inst), 'label_values(nbd_cbw_requests_total, instance)');
  t.equal(exp && variableQuery(exp), 'label_values(nbd_cbw_requests_total{instance=~"$instance"}, export)');
  for (const v of [inst, exp]) {
    t.equal(v?.type, 'query');
    t.equal(v?.allValue, '.*', `${v?.name}: "All" is the regex .*`);
    t.ok(v?.includeAll);
    t.equal(v?.datasource?.uid, '${datasource}');
  }

  const panels = allPanels(d);
  const ids = new Set<number>();
  const allowed = new Set(['row', 'timeseries', 'stat', 'gauge', 'bargauge']);
  for (const p of panels) {
    t.notOk(ids.has(p.id), `panel id ${p.id} is unique`);
    ids.add(p.id);
    t.ok(allowed.has(p.type), `panel "${p.title}" has a supported type (${p.type})`);
    t.ok(p.gridPos.x >= 0 && p.gridPos.w > 0 && p.gridPos.x + p.gridPos.w <= 24, `panel "${p.title}" fits the 24-column grid`);
    if (p.type === 'row') continue;
    t.equal(p.datasource?.uid, '${datasource}', `panel "${p.title}" uses the datasource variable`);
    t.ok((p.targets ?? []).length > 0, `panel "${p.title}" has queries`);
    const refIds = (p.targets ?? []).map((x) => x.refId);
    t.equal(new Set(refIds).size, refIds.length, `panel "${p.title}": refIds are unique`);
    for (const tg of p.targets ?? []) t.equal(tg.datasource?.uid, '${datasource}', `"${p.title}" ${tg.refId}: datasource variable`);
  }

  const top = d.panels;
  for (let i = 0; i < top.length; i++) {
    for (let j = i + 1; j < top.length; j++) {
      const a = top[i].gridPos;
      const b = top[j].gridPos;
      const overlap = a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
      if (overlap) t.fail(`panels "${top[i].title}" and "${top[j].title}" overlap`);
    }
  }

  // Every query: known variables only, known functions only, nbd_cbw_ metrics only.
  const queries = allQueries(d);
  t.ok(queries.length >= 25, `${queries.length} queries`);
  const used = new Set<string>();
  for (const q of queries) {
    const where = `"${q.panel}" ${q.refId}`;
    t.doesNotThrow(() => substitute(q.expr, { instance: '.*', export: '.*' }), `${where}: only known variables`);
    const { metrics, functions } = parsePromql(q.expr);
    t.ok(metrics.length > 0, `${where}: reads a metric`);
    for (const f of functions) t.ok(PROMQL_FUNCTIONS.has(f), `${where}: ${f}() is a PromQL function`);
    for (const m of metrics) {
      t.match(m, /^nbd_cbw_/, `${where}: ${m} is an nbd-cbw metric`);
      used.add(m);
    }
    // Every selector is filtered by the variables: by $instance always, and
    // by $export unless it is a process-wide metric (which has no export
    // label: the process's own, and its client connections).
    for (const sel of q.expr.match(/nbd_cbw_\w+(\{[^}]*\})?/g) ?? []) {
      t.match(sel, /\{[^}]*instance=~"\$instance"/, `${where}: ${sel} is filtered by $instance`);
      if (!/^nbd_cbw_(process_|nodejs_|connections\{|connections_refused_total)/.test(sel)) {
        t.match(sel, /\{[^}]*export=~"\$export"/, `${where}: ${sel} is filtered by $export`);
      }
    }
  }
  // What the issue asks the dashboard to show (and the connections, which
  // say why a client waits without a greeting).
  for (const m of [
    'nbd_cbw_requests_total', 'nbd_cbw_request_bytes_total', 'nbd_cbw_request_duration_seconds_bucket', 'nbd_cbw_requests_in_flight',
    'nbd_cbw_buffer_used_bytes', 'nbd_cbw_buffer_capacity_bytes', 'nbd_cbw_buffer_spill_bytes', 'nbd_cbw_buffer_high_water_bytes',
    'nbd_cbw_cbw_guest_writes_waited_total', 'nbd_cbw_cbw_wait_seconds_bucket', 'nbd_cbw_cbw_buffer_full_waits_total',
    'nbd_cbw_backup_done_bytes', 'nbd_cbw_backup_size_bytes', 'nbd_cbw_backup_state',
    'nbd_cbw_backup_target_written_bytes_total', 'nbd_cbw_backup_target_write_duration_seconds_bucket',
    'nbd_cbw_backup_errors_total', 'nbd_cbw_backup_target_retries_total', 'nbd_cbw_request_errors_total', 'nbd_cbw_cbw_failures_total',
    'nbd_cbw_process_resident_memory_bytes',
    'nbd_cbw_connections', 'nbd_cbw_connections_refused_total',
  ]) {
    t.ok(used.has(m), `the dashboard shows ${m}`);
  }
  const exprs = queries.map((q) => q.expr).join('\n');
  t.match(exprs, /histogram_quantile\(0\.5, sum by \(operation, le\) \(rate\(nbd_cbw_request_duration_seconds_bucket/, 'p50 per operation');
  t.match(exprs, /histogram_quantile\(0\.99, sum by \(operation, le\) \(rate\(nbd_cbw_request_duration_seconds_bucket/, 'p99 per operation');
  t.match(exprs, /sum by \(kind\) \(rate\(nbd_cbw_backup_target_written_bytes_total/, 'target throughput by kind');
  t.match(exprs, /deriv\(nbd_cbw_backup_done_bytes/, 'backup rate');

  // The parser itself, on the shapes the dashboard uses.
  t.same(
    parsePromql('histogram_quantile(0.99, sum by (operation, le) (rate(a_bucket{x=~"$y", e="1"}[$__rate_interval]))) / clamp_min(b, 1) and on (instance) (c == 1) or vector(0)'),
    { metrics: ['a_bucket', 'b', 'c'], functions: ['histogram_quantile', 'sum', 'rate', 'clamp_min', 'vector'] },
  );

  // Provisioning and the example Prometheus configuration.
  const dsYaml = fs.readFileSync(PROV_DATASOURCE, 'utf8');
  t.match(dsYaml, /^apiVersion: 1$/m);
  t.match(dsYaml, /^\s+type: prometheus$/m);
  t.match(dsYaml, /^\s+url: http:\/\/\S+:9090$/m);
  const dbYaml = fs.readFileSync(PROV_DASHBOARDS, 'utf8');
  t.match(dbYaml, /^apiVersion: 1$/m);
  t.match(dbYaml, /^\s+type: file$/m);
  t.match(dbYaml, /^\s+path: \S+$/m, 'points at a dashboard directory');
  const promYaml = fs.readFileSync(PROM_EXAMPLE, 'utf8');
  t.match(promYaml, /job_name: nbd-cbw/);
  t.match(promYaml, /targets: \['127\.0\.0\.1:9187'\]/);
  t.match(promYaml, /scrape_interval: 5s/);
  const promtool = spawnSync('promtool', ['check', 'config', PROM_EXAMPLE], { encoding: 'utf8', timeout: 30_000 });
  if (promtool.error) t.fail(`promtool: ${promtool.error.message}: ${INSTALL_HINT}`);
  else t.equal(promtool.status, 0, `promtool check config grafana/prometheus.yml\n${promtool.stdout}${promtool.stderr}`);
});

// ============================================================ 2. exposition

// Counters that have no series until their first event; the Prometheus test
// below makes each of them happen. Here they must at least be declared.
const EVENT_ONLY = new Set([
  'nbd_cbw_request_errors_total',
  'nbd_cbw_cbw_failures_total',
  'nbd_cbw_cbw_buffer_full_waits_total',
  'nbd_cbw_backup_target_retries_total',
  'nbd_cbw_backup_errors_total',
  'nbd_cbw_backup_jobs_ended_total',
]);

t.test('every metric the dashboard uses is in the live exposition, with a fitting type', async (t) => {
  const dir = tmpDir(t);
  const image = path.join(dir, 'disk.raw');
  makeImage(image, 16 * MiB, 'random', 7);
  const port = await freePort();
  const cbw = await startNbdCbw(t, ['--source', `file:${image}`, '--metrics', `127.0.0.1:${port}`]);
  const ctl = `${cbw.socket}.ctl`;

  // Guest I/O, then a backup with guest writes while it runs.
  const io = await run('qemu-io', ['-f', 'raw', cbw.uri, '-c', 'write -P 0x11 0 256k', '-c', 'read 0 256k', '-c', 'flush'], { timeoutMs: 30_000 });
  t.equal(io.code, 0, io.describe());
  await cli(['backup', 'start', '--control', ctl, '--target', `file:${path.join(dir, 'backup.raw')}`, '--speed', '4M']);
  const io2 = await run('qemu-io', ['-f', 'raw', cbw.uri, '-c', 'write -P 0x22 8M 128k', '-c', 'write -z 12M 64k'], { timeoutMs: 30_000 });
  t.equal(io2.code, 0, io2.describe());
  await cli(['backup', 'set-speed', '--control', ctl, '0']);
  await cli(['backup', 'wait', '--control', ctl], 60_000);

  const text = await scrape(port);
  const exp = parseExposition(text);
  t.ok(exp.types.size > 40, `${exp.types.size} metric families exposed`);

  const d = loadDashboard();
  const queries = allQueries(d);
  const names = new Set<string>();
  for (const q of queries) for (const m of parsePromql(q.expr).metrics) names.add(m);
  for (const v of d.templating.list) if (v.type === 'query') for (const m of parsePromql(variableQuery(v).replace(/^label_values\((.*),\s*\w+\)$/, '$1')).metrics) names.add(m);
  for (const name of [...names].sort()) {
    const fam = familyOf(exp, name);
    if (!t.ok(fam, `${name} is exposed (# TYPE)`)) continue;
    if (EVENT_ONLY.has(fam!.family)) continue;
    t.ok((exp.samples.get(name) ?? 0) > 0, `${name} has samples after I/O and a backup`);
  }

  // Functions fit the metric types.
  for (const q of queries) {
    const where = `"${q.panel}" ${q.refId}`;
    for (const [fn, metric] of rangeFunctionUses(q.expr)) {
      const fam = familyOf(exp, metric);
      if (!fam) continue; // reported above
      if (fn === 'rate' || fn === 'irate' || fn === 'increase') {
        t.ok(fam.type === 'counter' || (fam.type === 'histogram' && metric !== fam.family), `${where}: ${fn}(${metric}) on a counter (${fam.type})`);
      } else {
        t.equal(fam.type, 'gauge', `${where}: ${fn}(${metric}) on a gauge`);
      }
    }
    if (q.expr.includes('histogram_quantile')) {
      const buckets = parsePromql(q.expr).metrics.filter((m) => m.endsWith('_bucket'));
      t.ok(buckets.length > 0 && buckets.every((m) => familyOf(exp, m)?.type === 'histogram'), `${where}: histogram_quantile over _bucket series`);
    }
  }

  // Spot values: this server saw writes, reads, a flush and a completed backup.
  const writes = sampleSum(text, 'nbd_cbw_requests_total', { operation: 'write' });
  t.ok(writes >= 2, `${writes} guest writes counted`);
  t.ok(sampleSum(text, 'nbd_cbw_requests_total', { operation: 'write_zeroes' }) >= 1, 'the write-zeroes counted');
  t.ok(sampleSum(text, 'nbd_cbw_requests_total', { operation: 'flush' }) >= 1, 'the flush counted');
  const readBytes = sampleSum(text, 'nbd_cbw_request_bytes_total', { operation: 'read' });
  t.ok(readBytes >= 256 * 1024, `${readBytes} bytes read counted`);
  t.equal(sampleSum(text, 'nbd_cbw_backup_state', { state: 'completed' }), 1, 'the backup completed');
  t.equal(sampleSum(text, 'nbd_cbw_backup_done_bytes'), 16 * MiB, 'done = the disk');
  t.equal(sampleSum(text, 'nbd_cbw_backup_size_bytes'), 16 * MiB, 'size = the disk');
  t.ok(sampleSum(text, 'nbd_cbw_cbw_guest_writes_waited_total') >= 1, 'the writes during the backup waited for their old data');
  t.ok(sampleSum(text, 'nbd_cbw_process_resident_memory_bytes') > 0);

  // The control socket serves the same families.
  const viaCtl = await httpGet({ socketPath: ctl, path: '/metrics' });
  t.equal(viaCtl.status, 200);
  t.same([...parseExposition(viaCtl.body).types.keys()].sort(), [...exp.types.keys()].sort(), 'the control API /metrics has the same families');

  // --no-metrics: nothing collected, /metrics on the control API is 404.
  const off = await startNbdCbw(t, ['--source', `file:${image}`, '--no-metrics', '-r']);
  const r = await httpGet({ socketPath: `${off.socket}.ctl`, path: '/metrics' });
  t.equal(r.status, 404, '--no-metrics: no /metrics');
});

// ============================================================ 3. Prometheus

t.test('every dashboard query returns data from a real Prometheus', async (t) => {
  const version = spawnSync('prometheus', ['--version'], { encoding: 'utf8', timeout: 30_000 });
  if (version.error || version.status !== 0) {
    t.fail(`${INSTALL_HINT} (${version.error?.message ?? `prometheus --version exited ${version.status}`})`);
    return;
  }
  t.comment((version.stdout || version.stderr).split('\n')[0]);

  const dir = tmpDir(t);
  const [port1, port2, promPort] = [await freePort(), await freePort(), await freePort()];
  const inst1 = `127.0.0.1:${port1}`;
  const inst2 = `127.0.0.1:${port2}`;

  // ---- instance 1: healthy, under fio load; its target fails writes while TRIGGER exists.
  const disk1 = path.join(dir, 'disk1.raw');
  makeImage(disk1, 256 * MiB, 'random', 11);
  const trigger = path.join(dir, 'target-fails');
  const target1 = await startNbdkit(t, [
    '--filter=error', 'memory', '256M', 'error-pwrite=EIO', 'error-pwrite-rate=100%', `error-pwrite-file=${trigger}`,
  ]);
  // ---- instance 2: in trouble; its target takes 30 s per write.
  const disk2 = path.join(dir, 'disk2.raw');
  makeImage(disk2, 16 * MiB, 'random', 12);
  const target2 = await startNbdkit(t, ['--filter=delay', 'memory', '16M', 'wdelay=30'], {
    // nbdkit 1.32 may abort when a client hangs up during a delayed request (its bug).
    failOnUnexpectedExit: false,
  });
  const cbw1 = await startNbdCbw(t, ['--source', `file:${disk1}`, '--metrics', inst1]);
  const cbw2 = await startNbdCbw(t, ['--source', `file:${disk2}`, '--metrics', inst2]);

  // ---- Prometheus, configured from the example file: 1 s scrapes of both.
  const example = fs.readFileSync(PROM_EXAMPLE, 'utf8');
  const config = example
    .replace(/(scrape_interval|scrape_timeout|evaluation_interval): 5s/g, '$1: 1s')
    .replace("targets: ['127.0.0.1:9187']", `targets: ['${inst1}', '${inst2}']`);
  t.not(config, example);
  t.match(config, new RegExp(`targets: \\['${inst1}', '${inst2}'\\]`), 'the example config, pointed at both servers');
  t.notMatch(config, /: 5s/, 'every interval set to 1 s');
  const configFile = path.join(dir, 'prometheus.yml');
  fs.writeFileSync(configFile, config);
  const prom = spawnDaemon(t, 'prometheus', 'prometheus', [
    `--config.file=${configFile}`,
    `--storage.tsdb.path=${path.join(dir, 'prom-data')}`,
    `--web.listen-address=127.0.0.1:${promPort}`,
    '--storage.tsdb.retention.time=1h',
    '--log.level=warn',
  ]);
  const promAlive = () => (prom.proc.exitCode !== null || prom.proc.signalCode !== null ? `prometheus exited:\n${prom.output()}` : null);
  await waitFor(async () => (await httpGet({ url: `http://127.0.0.1:${promPort}/-/ready` })).status === 200, {
    timeoutMs: 30_000, intervalMs: 200, what: 'prometheus to be ready', abort: promAlive,
  });

  // ---- Instance 1: a backup at 2 MiB/s of a 256 MiB disk (about two minutes:
  // it must still run when the queries are made), fio on top.
  await cli(['backup', 'start', '--control', `${cbw1.socket}.ctl`, '--target', target1.uri, '--speed', '2M']);
  const fio = spawnDaemon(t, 'fio', 'fio', [
    '--name=guest', '--ioengine=nbd', `--uri=${cbw1.uri}`, '--rw=randrw', '--rwmixwrite=50', '--bs=4k', '--iodepth=4',
    '--size=32M', '--time_based', '--runtime=15', '--rate_iops=150,150', '--output-format=terse',
  ]);
  // Target writes fail while the trigger file exists: retried from the buffer.
  fs.writeFileSync(trigger, '');
  try {
    await waitFor(async () => sampleSum(await scrape(port1), 'nbd_cbw_backup_target_retries_total') > 0, {
      timeoutMs: 20_000, intervalMs: 100, what: 'instance 1 to retry a target write',
    });
  } finally {
    fs.rmSync(trigger, { force: true });
  }

  // ---- Instance 2: a 64 KiB buffer in front of a 30 s target, break-guest-write.
  const ctl2 = `${cbw2.socket}.ctl`;
  await cli([
    'backup', 'start', '--control', ctl2, '--target', target2.uri, '--buffer', '64K', '--cbw-timeout', '300ms',
    '--on-cbw-error', 'break-guest-write', '--speed', '64K', '--workers', '1', '--max-chunk', '64K',
  ]);
  // The first write's cluster fills the buffer (it cannot leave for 30 s)...
  const w1 = await run('qemu-io', ['-f', 'raw', cbw2.uri, '-c', 'write -P 0x33 8M 4k'], { timeoutMs: 30_000 });
  t.equal(w1.code, 0, `the first write fits the buffer\n${w1.describe()}`);
  // ...the second waits for room, times out, and is refused with EIO.
  const w2 = await run('qemu-io', ['-f', 'raw', cbw2.uri, '-c', 'write -P 0x44 12M 4k'], { timeoutMs: 30_000 });
  t.match(w2.stdout + w2.stderr, /Input\/output error|failed/i, `the second write fails\n${w2.describe()}`);
  const m2 = await scrape(port2);
  t.equal(sampleSum(m2, 'nbd_cbw_cbw_buffer_full_waits_total'), 1, 'instance 2: one buffer-full wait');
  t.equal(sampleSum(m2, 'nbd_cbw_cbw_failures_total'), 1, 'instance 2: one CBW failure');
  t.equal(sampleSum(m2, 'nbd_cbw_request_errors_total', { operation: 'write', error: 'EIO' }), 1, 'instance 2: one write EIO');
  await cli(['backup', 'cancel', '--control', ctl2]);

  // ---- Prometheus has scraped both, several times, including the events.
  await waitFor(
    async () => {
      const r = await httpGet({ url: `http://127.0.0.1:${promPort}/api/v1/targets` });
      const active = (JSON.parse(r.body) as { data: { activeTargets: Array<{ health: string; scrapeUrl: string; lastError: string }> } }).data.activeTargets;
      return active.length === 2 && active.every((a) => a.health === 'up');
    },
    { timeoutMs: 30_000, intervalMs: 250, what: 'both targets up in prometheus', abort: promAlive },
  );
  await waitFor(
    async () => {
      const r = await promQuery(promPort, 'count_over_time(up{job="nbd-cbw"}[1m]) >= 5 and up == 1');
      return r.data?.result.length === 2;
    },
    { timeoutMs: 30_000, intervalMs: 250, what: '5 scrapes of each target', abort: promAlive },
  );

  // ---- Every query of the dashboard, with "All" instances and exports.
  const d = loadDashboard();
  const vars = { instance: '.*', export: '.*' };
  const checks: Array<{ where: string; expr: string }> = [];
  for (const q of allQueries(d)) {
    const expr = substitute(q.expr, vars);
    checks.push({ where: `"${q.panel}" ${q.refId}`, expr });
    const lhs = /^(.*\S)\s+or\s+vector\(0\)$/.exec(expr);
    if (lhs) checks.push({ where: `"${q.panel}" ${q.refId} without its "or vector(0)"`, expr: lhs[1] });
  }
  // Poll until everything has data (each series needs two scrapes for rate()),
  // then assert each query on its own.
  let results = new Map<string, PromResult>();
  const evaluate = async () => {
    results = new Map();
    for (const c of checks) results.set(c.expr, await promQuery(promPort, c.expr));
    return checks.every((c) => {
      const r = results.get(c.expr);
      return r?.status === 'success' && (r.data?.result.length ?? 0) > 0;
    });
  };
  await waitFor(evaluate, { timeoutMs: 30_000, intervalMs: 1000, what: 'every dashboard query to return data', abort: promAlive }).catch(
    (e: Error) => t.comment(e.message),
  );
  for (const c of checks) {
    const r = results.get(c.expr);
    t.equal(r?.status, 'success', `${c.where}: query ok${r?.error ? `: ${r.error}` : ''}\n  ${c.expr}`);
    t.ok((r?.data?.result.length ?? 0) > 0, `${c.where}: returns data\n  ${c.expr}`);
  }
  t.ok(checks.length >= 40, `${checks.length} queries run`);

  // ---- The template variable queries (label_values) as Grafana runs them.
  for (const v of d.templating.list.filter((x) => x.type === 'query')) {
    const m = /^label_values\((.*),\s*(\w+)\)$/.exec(variableQuery(v));
    if (!t.ok(m, `${v.name}: a label_values() query`)) continue;
    const match = substitute(m![1], vars);
    const r = await httpGet({ url: `http://127.0.0.1:${promPort}/api/v1/label/${m![2]}/values?match[]=${encodeURIComponent(match)}` });
    const values = (JSON.parse(r.body) as { data: string[] }).data;
    if (v.name === 'instance') t.same([...values].sort(), [inst1, inst2].sort(), 'instance: both servers');
    else t.same(values, ['disk'], `${v.name}: the export`);
  }

  // ---- And a few numbers, through Prometheus, that must make sense now.
  const num = async (expr: string): Promise<number[]> => ((await promQuery(promPort, expr)).data?.result ?? []).map((x) => Number(x.value[1]));
  const sel1 = `instance="${inst1}"`;
  const [writeIops] = await num(`sum(rate(nbd_cbw_requests_total{${sel1}, operation="write"}[15s]))`);
  t.ok(writeIops > 0, `instance 1: guest write IOPS ${writeIops}`);
  const [progress] = await num(`100 * nbd_cbw_backup_done_bytes{${sel1}} / nbd_cbw_backup_size_bytes{${sel1}}`);
  t.ok(progress > 0 && progress < 100, `instance 1: backup ${progress?.toFixed(1)}% done, still running`);
  t.same(await num(`nbd_cbw_backup_state{${sel1}, state="running"}`), [1], 'instance 1: running');
  t.same(await num(`nbd_cbw_backup_state{instance="${inst2}", state="cancelled"}`), [1], 'instance 2: cancelled');
  const [retries] = await num(`sum(nbd_cbw_backup_target_retries_total{${sel1}})`);
  t.ok(retries >= 1, `instance 1: ${retries} target retries`);
  const [bufferCap2] = await num(`nbd_cbw_buffer_capacity_bytes{instance="${inst2}"}`);
  t.equal(bufferCap2, 64 * 1024, 'instance 2: --buffer 64K');
  const [waited] = await num(`sum(nbd_cbw_cbw_guest_writes_waited_total{${sel1}})`);
  t.ok(waited > 0, `instance 1: ${waited} guest writes waited for copy-before-write`);

  // fio ran against nbd-cbw without errors (it may still be running: stop it first).
  await killProcess(fio.proc, 5000);
  t.notMatch(fio.output(), /fio: (io_u error|pid=\d+, err=)/, 'fio saw no I/O errors');
  t.ok(cbw1.running() && cbw2.running(), 'both nbd-cbw still running');
});
