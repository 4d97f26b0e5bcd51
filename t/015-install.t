# Installs the way users do - `make install DESTDIR=... PREFIX=...` and `luarocks make --tree ...` - into scratch
# prefixes outside the checkout, then starts nginx with the README's complete nginx.conf (taken from README.md, not
# copied), adjusted only for the prefix paths, the listen port, loopback peers and the private pid/log/temp paths,
# from that prefix alone; sends requests through it and reads the status and the Prometheus metrics.
use strict;
use warnings;
use lib 't/lib';
use Test::More;
use File::Find ();
use ScratchNginx qw(scratch_dir temp_paths start_nginx stop_nginx http_get backends_conf repo_root
                    readme_conf lua_paths_report);

my $repo = repo_root();
my $port = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
my @backend_ports = ($port + 1, $port + 2, $port + 3);
my $report_port = $port + 4;

my ($rockspec) = glob "$repo/lua-resty-autoscale-*.rockspec";
ok($rockspec, 'a rockspec is there') or BAIL_OUT('no rockspec');

# Every module under lua/, as a path relative to a Lua directory.
my @modules;
File::Find::find({ no_chdir => 1, wanted => sub {
    push @modules, substr($_, length("$repo/lua/")) if /\.lua$/;
} }, "$repo/lua");
@modules = sort @modules;
ok(scalar(grep { m{^resty/autoscale/discovery/} } @modules), 'lua/ has modules in subdirectories (discovery/)');

my $backends_dir = scratch_dir('backends');
my ($backends, $err) = start_nginx($backends_dir, backends_conf($backends_dir, @backend_ports));
ok($backends, 'backends started') or diag($err);

sub run_cmd {
    my ($what, @cmd) = @_;
    my $out = `cd '$repo' && @cmd 2>&1`;
    my $rc = $? >> 8;
    is($rc, 0, "$what exits 0") or diag("@cmd\n$out");
    return $rc == 0;
}

sub serve_from_prefix {
    my ($how, $lua_dir, $clib_dir) = @_;
    subtest "$how: every module installed" => sub {
        ok(-f "$lua_dir/$_", "$_") for @modules;
        ok(-f "$clib_dir/libresty_autoscale.so", 'libresty_autoscale.so');
    };
    my $dir = scratch_dir('gateway');
    my $conf = readme_conf();
    # Adjustments: each must apply, so a change to the README's example is noticed here.
    my %n;
    $n{lua_path}  = $conf =~ s{(lua_package_path\s+")/usr/local/share/lua/5\.1/}{$1$lua_dir/}g;
    $n{lua_cpath} = $conf =~ s{(lua_package_cpath\s+")/usr/local/lib/lua/5\.1/}{$1$clib_dir/}g;
    $n{listen}    = $conf =~ s{\blisten\s+80;}{listen 127.0.0.1:$port;}g;
    my $i = 0;
    $n{peers}     = $conf =~ s{"\d+\.\d+\.\d+\.\d+:\d+"}{'"127.0.0.1:' . $backend_ports[$i++ % @backend_ports] . '"'}ge;
    $n{http}      = $conf =~ s#^http \{\n#"http {\n    access_log $dir/logs/access.log;\n" . temp_paths($dir)#me;
    $n{report}    = $conf =~ s/\}\s*\z/lua_paths_report($report_port) . "}\n"/e;
    $conf = "pid $dir/logs/nginx.pid;\nerror_log $dir/logs/error.log info;\n$conf";
    is_deeply([grep { !$n{$_} } sort keys %n], [], "$how: the README's nginx.conf takes every adjustment");
    unlike($conf, qr{\Q$repo\E}, "$how: the configuration names no path in the checkout");

    my ($pid, $err) = start_nginx($dir, $conf);
    ok($pid, "$how: nginx starts with the README's nginx.conf") or diag($err);
    return unless $pid;

    my $paths = http_get("http://127.0.0.1:$report_port/paths");
    is($paths->{status}, 200, "$how: the paths report answers");
    unlike($paths->{content}, qr{\Q$repo\E}, "$how: package.path and package.cpath hold no checkout path")
        or diag($paths->{content});
    like($paths->{content}, qr{^module resty\.autoscale \Q$lua_dir\E/resty/autoscale\.lua$}m,
        "$how: resty.autoscale comes from the prefix") or diag($paths->{content});
    like($paths->{content}, qr{^module resty\.autoscale\.discovery\.addr \Q$lua_dir\E/}m,
        "$how: resty.autoscale.discovery.addr comes from the prefix");
    my $maps = ScratchNginx::slurp("/proc/$pid/maps");
    my %so = map { $_ => 1 } $maps =~ m{(\S*libresty_autoscale\.so)$}mg;
    is_deeply([sort keys %so], ["$clib_dir/libresty_autoscale.so"], "$how: the library mapped is the prefix's");

    my %codes;
    my %served;
    for (1 .. 30) {
        my $r = http_get("http://127.0.0.1:$port/");
        $codes{$r->{status}}++;
        $served{$1}++ if $r->{status} == 200 && $r->{content} =~ /^backend (\d+)/;
    }
    is_deeply(\%codes, { 200 => 30 }, "$how: 30 requests through the gateway answer 200");
    my $n_served = 0;
    $n_served += $_ for values %served;
    is($n_served, 30, "$how: each answer came from a backend");
    cmp_ok(scalar(keys %served), '>=', 2, "$how: the load is spread over the peers") or diag(explain(\%served));

    my $st = http_get("http://127.0.0.1:$port/autoscale/status");
    is($st->{status}, 200, "$how: /autoscale/status answers 200");
    like($st->{content}, qr{"api"}, "$how: the status names the upstream");
    my $m = http_get("http://127.0.0.1:$port/metrics");
    is($m->{status}, 200, "$how: /metrics answers 200");
    like($m->{content}, qr/^autoscale_\w+\{[^}]*upstream="api"[^}]*\} \d/m, "$how: /metrics has autoscale metrics of api")
        or diag(substr($m->{content} // '', 0, 2000));
    my $d = http_get("http://127.0.0.1:$port/autoscale/dashboard");
    is($d->{status}, 200, "$how: /autoscale/dashboard answers 200");

    ok(stop_nginx($pid), "$how: nginx stopped (pid $pid)");
    my $log = ScratchNginx::slurp("$dir/logs/error.log");
    unlike($log, qr{\[(?:error|crit|alert|emerg)\]}, "$how: no error in the error log")
        or diag(join "\n", grep { /\[(?:error|crit|alert|emerg)\]/ } split /\n/, $log);
}

# 1. make install with a staging root and a prefix
SKIP: {
    my $root = scratch_dir('make-install');
    run_cmd('make install', "make -s install DESTDIR='$root' PREFIX=/opt/resty-autoscale") or skip 'make install failed', 1;
    serve_from_prefix('make install', "$root/opt/resty-autoscale/share/lua/5.1", "$root/opt/resty-autoscale/lib/lua/5.1");

    run_cmd('make uninstall', "make -s uninstall DESTDIR='$root' PREFIX=/opt/resty-autoscale");
    my @left;
    File::Find::find({ no_chdir => 1, wanted => sub { push @left, $_ if -f } }, $root);
    is_deeply(\@left, [], 'make uninstall removes every file it installed');
}

# 2. luarocks make (Debian's luarocks; builds the library with cargo through `make lib`, no network)
SKIP: {
    skip 'luarocks not installed (make deps installs it)', 1 unless system('which luarocks >/dev/null 2>&1') == 0;
    my $tree = scratch_dir('luarocks');
    run_cmd('luarocks make', "luarocks --lua-version 5.1 make --tree '$tree' '$rockspec'")
        or skip 'luarocks make failed', 1;
    serve_from_prefix('luarocks make', "$tree/share/lua/5.1", "$tree/lib/lua/5.1");
}

ok(stop_nginx($backends), 'backends stopped') if $backends;
done_testing();
