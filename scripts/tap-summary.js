#!/usr/bin/env node
// Count results from raw TAP as tap 21 prints it: each test file is a
// top-level subtest, and each t.test() inside it is one level deeper. We
// count those second-level tests; a file that failed without any failing
// test inside it (a crash, a syntax error) counts as one failure.
'use strict';
const fs = require('fs');
const lines = fs.readFileSync(process.argv[2], 'utf8').split('\n');
let passed = 0;
let failed = 0;
let fileFailuresInside = 0;
for (const line of lines) {
  const inner = /^ {4}(not )?ok \d+/.exec(line);
  if (inner) {
    if (inner[1]) {
      failed++;
      fileFailuresInside++;
    } else passed++;
    continue;
  }
  const top = /^(not )?ok \d+/.exec(line);
  if (top) {
    if (top[1] && fileFailuresInside === 0) failed++;
    fileFailuresInside = 0;
  }
}
if (passed + failed === 0) failed = 1; // no tests ran: that is a failure
console.log(`${passed} passed, ${failed} failed`);
