'use strict';
// A minimal QMP client for scripts/bench/vs-qemu: one connection to a
// qemu-storage-daemon monitor socket (it serves one client at a time),
// qmp_capabilities first, then commands with ids; events are kept and can be
// awaited. Plain Node, no dependencies.

const net = require('node:net');

class Qmp {
  constructor(socketPath) {
    this.socketPath = socketPath;
    this.sock = null;
    this.buf = '';
    this.nextId = 1;
    this.pending = new Map();
    this.events = [];
    this.eventWaiters = [];
    this.greeting = null;
    this.closed = false;
  }

  /** Connect, read the greeting, negotiate capabilities. */
  async connect(timeoutMs = 10000) {
    const deadline = Date.now() + timeoutMs;
    let lastErr;
    while (Date.now() < deadline) {
      try {
        await this._open();
        break;
      } catch (e) {
        lastErr = e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
    if (!this.sock) throw new Error(`QMP: cannot connect to ${this.socketPath}: ${lastErr && lastErr.message}`);
    await this.greetingPromise;
    await this.cmd('qmp_capabilities');
    return this;
  }

  _open() {
    return new Promise((resolve, reject) => {
      const s = net.createConnection({ path: this.socketPath });
      s.once('error', reject);
      s.once('connect', () => {
        s.removeListener('error', reject);
        this.sock = s;
        this.greetingPromise = new Promise((res) => (this._greeted = res));
        s.setEncoding('utf8');
        s.on('data', (d) => this._data(d));
        s.on('error', () => {});
        s.on('close', () => {
          this.closed = true;
          for (const [, p] of this.pending) p.reject(new Error('QMP connection closed'));
          this.pending.clear();
        });
        resolve();
      });
    });
  }

  _data(d) {
    this.buf += d;
    let i;
    while ((i = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, i).trim();
      this.buf = this.buf.slice(i + 1);
      if (!line) continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      if (msg.QMP) {
        this.greeting = msg.QMP;
        this._greeted();
      } else if (msg.event) {
        msg.receivedAt = Date.now();
        this.events.push(msg);
        for (const w of [...this.eventWaiters]) {
          if (w.match(msg)) {
            this.eventWaiters.splice(this.eventWaiters.indexOf(w), 1);
            clearTimeout(w.timer);
            w.resolve(msg);
          }
        }
      } else if (msg.id !== undefined && this.pending.has(msg.id)) {
        const p = this.pending.get(msg.id);
        this.pending.delete(msg.id);
        if (msg.error) p.reject(new Error(`QMP ${p.name}: ${msg.error.class}: ${msg.error.desc}`));
        else p.resolve(msg.return);
      }
    }
  }

  /** Run a command; resolves with its return value, rejects on a QMP error. */
  cmd(name, args, timeoutMs = 30000) {
    if (this.closed || !this.sock) return Promise.reject(new Error('QMP connection closed'));
    const id = this.nextId++;
    const msg = { execute: name, id };
    if (args !== undefined) msg.arguments = args;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`QMP ${name}: no answer in ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        name,
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }

  /** The first event (already received or future) for which match(msg) is true. */
  waitEvent(match, timeoutMs) {
    const seen = this.events.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = { match, resolve };
      w.timer = setTimeout(() => {
        this.eventWaiters.splice(this.eventWaiters.indexOf(w), 1);
        reject(new Error(`QMP: no matching event in ${timeoutMs} ms`));
      }, timeoutMs);
      this.eventWaiters.push(w);
    });
  }

  close() {
    if (this.sock) this.sock.destroy();
    this.closed = true;
  }
}

module.exports = { Qmp };
