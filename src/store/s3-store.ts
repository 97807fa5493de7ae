// s3://BUCKET/PREFIX with the AWS SDK v3: works with AWS S3, Ceph radosgw and
// MinIO. Endpoint, region and path style come from options or the usual AWS
// environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION,
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...). The SDK retries throttling,
// 5xx and connection errors with backoff; the backup engine retries on top.

import {
  DeleteObjectCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
} from '@aws-sdk/client-s3';
import type { ObjectStore, S3Settings, StoredObject } from './object-store';

interface AwsError {
  name?: string;
  $metadata?: { httpStatusCode?: number };
}

export class S3Store implements ObjectStore {
  readonly description: string;

  private constructor(
    private readonly client: S3Client,
    private readonly bucket: string,
    private readonly prefix: string,
  ) {
    this.description = `s3://${bucket}/${prefix}`;
  }

  static async open(spec: string, s: S3Settings): Promise<S3Store> {
    const m = /^s3:\/\/([^/]+)\/?(.*)$/.exec(spec);
    if (!m || !m[1]) throw new Error(`bad S3 location "${spec}": use s3://BUCKET/PREFIX`);
    const prefix = m[2] && !m[2].endsWith('/') ? `${m[2]}/` : m[2];
    const endpoint = s.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL;
    const client = new S3Client({
      region: s.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      ...(endpoint && { endpoint }),
      forcePathStyle: s.forcePathStyle ?? false,
      maxAttempts: 6,
      retryMode: 'standard',
      // Older radosgw and MinIO reject the SDK's default flexible checksums.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    });
    return new S3Store(client, m[1], prefix);
  }

  private key(k: string): string {
    return this.prefix + k;
  }

  async get(key: string): Promise<Buffer | null> {
    try {
      const r = await this.client.send(new GetObjectCommand({ Bucket: this.bucket, Key: this.key(key) }));
      if (!r.Body) return Buffer.alloc(0);
      const bytes = await r.Body.transformToByteArray();
      return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    } catch (e) {
      const err = e as AwsError;
      if (err.name === 'NoSuchKey' || err.$metadata?.httpStatusCode === 404) return null;
      throw describe(e, `GET ${this.key(key)}`);
    }
  }

  async putIfAbsent(key: string, data: Buffer): Promise<boolean> {
    try {
      await this.client.send(
        new PutObjectCommand({ Bucket: this.bucket, Key: this.key(key), Body: data, ContentLength: data.length, IfNoneMatch: '*' }),
      );
      return true;
    } catch (e) {
      const err = e as AwsError;
      // 412: someone (an earlier backup) stored these bytes already.
      if (err.$metadata?.httpStatusCode === 412 || err.name === 'PreconditionFailed') return false;
      throw describe(e, `PUT ${this.key(key)}`);
    }
  }

  async put(key: string, data: Buffer): Promise<void> {
    try {
      await this.client.send(new PutObjectCommand({ Bucket: this.bucket, Key: this.key(key), Body: data, ContentLength: data.length }));
    } catch (e) {
      throw describe(e, `PUT ${this.key(key)}`);
    }
  }

  async *list(prefix: string): AsyncIterable<StoredObject> {
    let token: string | undefined;
    do {
      let r;
      try {
        r = await this.client.send(
          new ListObjectsV2Command({ Bucket: this.bucket, Prefix: this.key(prefix), ContinuationToken: token }),
        );
      } catch (e) {
        throw describe(e, `LIST ${this.key(prefix)}`);
      }
      for (const o of r.Contents ?? []) {
        if (o.Key) yield { key: o.Key.slice(this.prefix.length), size: o.Size ?? 0 };
      }
      token = r.IsTruncated ? r.NextContinuationToken : undefined;
    } while (token);
  }

  async delete(key: string): Promise<void> {
    try {
      await this.client.send(new DeleteObjectCommand({ Bucket: this.bucket, Key: this.key(key) }));
    } catch (e) {
      throw describe(e, `DELETE ${this.key(key)}`);
    }
  }

  async close(): Promise<void> {
    this.client.destroy();
  }
}

function describe(e: unknown, what: string): Error {
  const err = e as AwsError & Error;
  const status = err.$metadata?.httpStatusCode;
  return new Error(`S3 ${what} failed: ${err.name ?? 'error'}${status ? ` (HTTP ${status})` : ''}${err.message ? `: ${err.message}` : ''}`);
}
