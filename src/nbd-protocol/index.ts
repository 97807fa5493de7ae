// The NBD wire format with no I/O: constants, messages, parsers, builders.
export * from './constants';
export * from './messages';
export * from './parser';
export * as build from './serializer';
export * from './decode';
