// Target specs as users write them (file:PATH, dir:PATH, s3://..., nbd URIs),
// checked and rewritten without opening anything: the CLI uses these too.

export function validateTargetSpec(spec: string): string | null {
  if (spec.startsWith('file:') && spec.length > 5) return null;
  if (spec.startsWith('dir:') && spec.length > 4) return null;
  if (/^s3:\/\/[^/]+/.test(spec)) return null;
  if (/^nbds?(\+unix)?:\/\//.test(spec)) return null;
  return `unrecognised target "${spec}": use file:PATH, dir:PATH, s3://BUCKET/PREFIX, nbd[s]://HOST[:PORT]/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH`;
}

/**
 * `spec` with each local path it names passed through `f`: a file: or dir:
 * path, and an NBD URI's socket= and tls-certificates= (s3:// names none).
 * The CLI makes them absolute with it: the job runs in the server, whose
 * working directory is not the caller's.
 */
export function mapTargetPaths(spec: string, f: (path: string) => string): string {
  for (const scheme of ['file:', 'dir:']) {
    if (spec.startsWith(scheme)) return scheme + f(spec.slice(scheme.length));
  }
  if (!/^nbds?(\+unix)?:\/\//.test(spec)) return spec;
  return spec.replace(/([?&](?:socket|tls-certificates)=)([^&#]*)/g, (whole, key: string, value: string) => {
    let path: string;
    try {
      path = decodeURIComponent(value.replace(/\+/g, ' ')); // as URLSearchParams reads it
    } catch {
      return whole;
    }
    const mapped = f(path);
    return mapped === path ? whole : key + encodeURIComponent(mapped).replace(/%2F/gi, '/');
  });
}
