/**
 * Exception store types by table code (Linux dm_exception_store_type_register / get_type): `P` persistent, `PO`
 * persistent reporting Overflow when full, `N` transient. Targets find stores here and never import a concrete
 * store. Codes are matched case-insensitively, as Linux upper-cases the argument.
 */
import type { AnyExceptionStoreType } from './contract.js';
import { persistentStore } from './persistent-store.js';
import { transientStore } from './transient-store.js';

/** A table code resolved: the store type and whether it is the overflow variant (PO). */
export interface ExceptionStoreLookup {
  readonly type: AnyExceptionStoreType;
  readonly overflow: boolean;
}

export type ExceptionStoreCode = 'P' | 'PO' | 'N';

export class ExceptionStoreRegistry {
  private readonly byCode = new Map<string, ExceptionStoreLookup>();

  /** Registers `type` under `code` (upper case); `overflow` for the PO-style variant of a type. */
  register(code: string, type: AnyExceptionStoreType, overflow = false): void {
    this.byCode.set(code.toUpperCase(), Object.freeze({ type, overflow }));
  }

  /** The store for a table code (`P`, `po`, `N`...), or undefined for an unknown one. */
  lookup(code: string): ExceptionStoreLookup | undefined {
    return this.byCode.get(code.toUpperCase());
  }

  /** The registered codes, in registration order. */
  codes(): string[] {
    return [...this.byCode.keys()];
  }
}

export function createDefaultExceptionStoreRegistry(): ExceptionStoreRegistry {
  const r = new ExceptionStoreRegistry();
  r.register('P', persistentStore);
  r.register('PO', persistentStore, true);
  r.register('N', transientStore);
  return r;
}

const defaultRegistry = createDefaultExceptionStoreRegistry();

/** The default registry's store type for a table code; undefined for an unknown code. */
export function findExceptionStoreType(code: ExceptionStoreCode): AnyExceptionStoreType;
export function findExceptionStoreType(code: string): AnyExceptionStoreType | undefined;
export function findExceptionStoreType(code: string): AnyExceptionStoreType | undefined {
  return defaultRegistry.lookup(code)?.type;
}

/** The default registry's lookup (type and overflow flag) for a table code; undefined for an unknown code. */
export function lookupExceptionStore(code: string): ExceptionStoreLookup | undefined {
  return defaultRegistry.lookup(code);
}
