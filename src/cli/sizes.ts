// Sizes on the command line: bytes, or a number with K, M, G, T (powers of 1024).

const UNITS: Record<string, number> = { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$/i.exec(text);
  if (!m) throw new Error(`bad ${what} "${text}": expected a number with an optional K, M, G or T suffix`);
  const value = Number(m[1]) * UNITS[m[2].toUpperCase()];
  if (!Number.isSafeInteger(Math.round(value))) throw new Error(`bad ${what} "${text}": too large`);
  return Math.round(value);
}

export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${v.toFixed(v >= 100 ? 0 : 1)} ${units[i]}`;
}
