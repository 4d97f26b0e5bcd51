# vim:set ft=perl ts=4 sw=4 et:
# bin/resty-autoscale-check, the configuration check operators run before a reload (`nginx -t` does not run
# init_by_lua*):
#
# 1. it gives the verdict nginx start gives, with the same message, for every configuration the suites in t/ pass to
#    autoscale.configure / autoscale.admin in init_by_lua_block (every call is recorded by t/lib/config_cases.lua
#    while the block's init code runs), and for every block that must not start, from the block's nginx.conf;
# 2. every ```lua and ```nginx example in README.md and docs/*.md is extracted and validated: a complete nginx.conf by
#    the check (and its syntax by `nginx -t`), a fragment as the marker comment in the line above its fence says:
#
#      <!-- check: upstream -->   Lua fields of one upstream: checked inside { upstreams = { api = { peers = .., <it> } } }
#      <!-- check: top -->        Lua top-level fields: checked next to an upstream
#      <!-- check: configure -->  a Lua table given to autoscale.configure as it stands
#      <!-- check: init -->       Lua code of init_by_lua_block (autoscale is required first): the check on it
#      <!-- check: main -->       an nginx.conf without its load_module lines and events block: both added
#      <!-- check: http -->       nginx directives of the http block: the check and `nginx -t` inside a complete conf
#      <!-- check: server -->     nginx directives of a server block: `nginx -t` inside a complete conf
#      <!-- check: location -->   nginx directives of a location: `nginx -t`
#      <!-- check: lua -->        Lua code that runs elsewhere (a handler, a script): its syntax
#      <!-- check: skip REASON --> not checked, for the reason given
#
#    and `files=/abs/path,...` after the kind: files the example reads (a secret, a token) are created in a scratch
#    directory and the example checked with its path there. docs/*.conf files with init_by_lua* are checked whole.
# Plain Test::More: it runs the same under the bundled runner and the real Test::Nginx.

use strict;
use warnings;
use Test::More;
use Cwd ();
use File::Basename ();
use File::Temp ();
use File::Path ();

my $Repo  = Cwd::abs_path(File::Basename::dirname(__FILE__) . '/..');
my $Check = "$Repo/bin/resty-autoscale-check";
my $Nginx = $ENV{TEST_NGINX_BINARY} && $ENV{TEST_NGINX_BINARY} !~ m{/t/Autoscale/nginx$} ? $ENV{TEST_NGINX_BINARY}
          : '/usr/sbin/nginx';
my $Lib   = $ENV{AUTOSCALE_LIB_DIR} || "$Repo/target/release";
my @Modules = grep { -f } map { "/usr/lib/nginx/modules/$_.so" } qw(ndk_http_module ngx_http_lua_module);
# the native module (make module), for the examples with `autoscale` upstreams (docs/native-module.md); loaded after
# the Lua module, it does nothing for a configuration without them
my $Native_module = "$Repo/target/release/ngx_http_autoscale_module.so";

plan skip_all => "no nginx at $Nginx" unless -x $Nginx;
plan skip_all => "no $Lib/libresty_autoscale.so (cargo build --release)" unless -f "$Lib/libresty_autoscale.so";

$ENV{RESTY_AUTOSCALE_LUA_DIR} = "$Repo/lua";
$ENV{RESTY_AUTOSCALE_LIB_DIR} = $Lib;
$ENV{RESTY_AUTOSCALE_NGINX} = $Nginx;
# what ";;" in a lua_package_(c)path stands for, as t/Autoscale.pm sets it for the suites
$ENV{LUA_PATH}  = "$Repo/lua/?.lua;$Repo/t/lib/?.lua;;";
$ENV{LUA_CPATH} = "$Lib/?.so;;";
# the tokens the suites and the docs name (t/013-admin.t sets the same)
$ENV{AUTOSCALE_ADMIN_TOKEN} = 'test-admin-token-0123456789abcdef';
$ENV{AUTOSCALE_SHORT_TOKEN} = 'short';

my $Scratch = File::Temp::tempdir('autoscale-016-XXXXXX', TMPDIR => 1, CLEANUP => 1);
my $Port = $ENV{TEST_NGINX_SERVER_PORT} || 1984;
# the check's scratch directories go here, so that the test sees whether one is left behind
File::Path::make_path("$Scratch/tmp");
$ENV{TMPDIR} = "$Scratch/tmp";

sub slurp { my ($f) = @_; open my $fh, '<', $f or return undef; local $/; my $s = <$fh>; close $fh; $s }
sub spew  { my ($f, $s) = @_; open my $fh, '>', $f or die "$f: $!"; print $fh $s; close $fh }

# run_check(FILE, ARGS...): (exit status, everything printed)
sub run_check {
    my @cmd = ($Check, @_);
    my $out = `@{[ join ' ', map { "'$_'" } @cmd ]} 2>&1`;
    return ($? >> 8, $out);
}

# The init phase of a throwaway nginx (master_process off, exits from init_by_lua_file), as the check runs it.
sub run_lua {
    my ($dir, $lua, $http) = @_;
    File::Path::make_path("$dir/logs", "$dir/conf");
    spew("$dir/run.lua", $lua);
    my $conf = join '', map { "load_module $_;\n" } @Modules;
    $conf .= "daemon off; master_process off; pid $dir/logs/nginx.pid; error_log $dir/logs/error.log warn;\n"
           . "events { worker_connections 16; }\nhttp {\n"
           . join('', map { "    ${_}_temp_path $dir/${_}_temp;\n" } qw(client_body proxy fastcgi uwsgi scgi))
           . qq{    lua_package_path "$Repo/lua/?.lua;$Repo/t/lib/?.lua;;";\n}
           . qq{    lua_package_cpath "$Lib/?.so;;";\n}
           . ($http // '')
           . "    init_by_lua_file $dir/run.lua;\n}\n";
    spew("$dir/conf/nginx.conf", $conf);
    my $out = `timeout -k 5 60 $Nginx -p $dir/ -e $dir/logs/error.log -c $dir/conf/nginx.conf 2>&1 </dev/null`;
    return ($? >> 8, $out . (slurp("$dir/logs/error.log") // ''));
}

# The message nginx start would print, without where it was raised ("init_by_lua(nginx.conf:7):3: ").
sub message {
    my ($err) = @_;
    $err =~ s/^.*?:\d+: //mg;
    return $err;
}

sub contains_each {
    my ($out, $expected) = @_;
    for my $line (grep { /\S/ } split /\n/, $expected) {
        return $line if index($out, $line) < 0;
    }
    return undef;
}

sub conf_around_http {
    my ($http) = @_;
    my $conf = join '', map { "load_module $_;\n" } @Modules;
    $conf .= "events { worker_connections 16; }\nhttp {\n";
    $conf .= qq{    lua_package_path "$Repo/lua/?.lua;$Repo/t/lib/?.lua;;";\n} unless $http =~ /\blua_package_path\b/;
    $conf .= qq{    lua_package_cpath "$Lib/?.so;;";\n} unless $http =~ /\blua_package_cpath\b/;
    return $conf . $http . "\n}\n";
}

############################################################################ 1. the suites' configurations

my ($replayed, $rejected, $dead) = (0, 0, 0);
my $n_block = 0;
for my $file (sort glob "$Repo/t/*.t") {
    next if $file =~ m{/(000-|016-)};
    my $text = slurp($file);
    $text =~ s/^.*?\n__DATA__\n//s or next;
    for my $block (split /^(?====\s*TEST)/m, $text) {
        my ($title) = $block =~ /^===\s*(TEST \d+[^\n]*)/ or next;
        my %sec;
        my @parts = split /^---\s*(\w+)([^\n]*)\n/m, $block;
        shift @parts;
        while (@parts) {
            my ($name, $rest, $body) = splice @parts, 0, 3;
            $sec{$name} = { rest => $rest, body => $body // '' };
        }
        my $http = $sec{http_config} or next;
        next if $http->{rest} =~ /\S/;                       # "eval:": built by Perl code
        my $body = $http->{body};
        next unless $body =~ /\binit_by_lua_block\b/ && $body =~ /autoscale/;
        next if $body =~ /\$::/;
        my $where = File::Basename::basename($file) . " $title";
        my $dir = "$Scratch/suite" . ++$n_block;
        my $html = "$dir/html";
        File::Path::make_path($html);
        if (my $uf = $sec{user_files}) {
            for my $f (split /^>>> /m, $uf->{body}) {
                next unless $f =~ /\S/;
                my ($name, $content) = $f =~ /^(\S+)[^\n]*\n(.*)$/s or next;
                my $path = "$html/$name";
                File::Path::make_path(File::Basename::dirname($path));
                spew($path, $content);
            }
        }
        my $i = 0;
        $body =~ s/\$TEST_NGINX_RAND_PORT_(\d+)/$Port + $1/ge;
        $body =~ s/\$TEST_NGINX_SERVER_PORT/$Port/g;
        $body =~ s/\$TEST_NGINX_HTML_DIR/$html/g;
        $body =~ s/\$TEST_NGINX_REPO/$Repo/g;
        $body =~ s/\$TEST_NGINX_\w+/1/g;
        spew("$dir/block.conf", conf_around_http($body));

        # each call of configure/admin in the block's init code, replayed through the check
        my $dicts = join '', map { "    $_\n" } $body =~ /^\s*(lua_shared_dict\s+[^;]+;)/mg;
        my ($rc, $out) = run_lua($dir, qq{require("config_cases").record("$Repo/lua/resty/autoscale/check.lua", }
                                       . qq{"$dir/block.conf", "$dir")\n}, $dicts);
        if (!-f "$dir/done") {
            fail("$where: the init code ran in the recorder");
            diag($out);
            next;
        }
        for my $rec (sort { ($a =~ /(\d+)\.lua$/)[0] <=> ($b =~ /(\d+)\.lua$/)[0] } glob "$dir/rec_*.lua") {
            (my $errf = $rec) =~ s/\.lua$/.err/;
            my $err = slurp($errf);
            next if defined $err && $err =~ /lua_shared_dict autoscale_scaling/;   # checked from the conf below
            my ($crc, $cout) = run_check('--lua', $rec);
            $replayed++;
            my ($n) = $rec =~ /rec_(\d+)/;
            if (defined $err) {
                $rejected++;
                my $missing = contains_each($cout, message($err));
                ok($crc == 1 && !defined $missing, "$where, call $n: rejected with the same message")
                    or diag("expected (exit 1): " . message($err) . "\ngot (exit $crc): $cout");
            } else {
                is($crc, 0, "$where, call $n: accepted") or diag($cout);
            }
        }

        # a block that must not start: the check on its nginx.conf fails with the block's error_log lines
        if ($sec{must_die} && $sec{error_log} && $sec{error_log}{rest} !~ /eval/) {
            my ($crc, $cout) = run_check('--conf', "$dir/block.conf");
            my $missing = contains_each($cout, $sec{error_log}{body});
            $dead++;
            ok($crc == 1 && !defined $missing, "$where: its nginx.conf is rejected with the block's error_log lines")
                or diag("missing: " . ($missing // '') . "\ngot (exit $crc): $cout");
        }
    }
}
ok($replayed >= 40 && $rejected >= 30 && $dead >= 8,
   "the suites' configurations were found ($replayed calls replayed, $rejected of them rejected; $dead blocks that must not start)");

############################################################################ 2. every example in the docs

my %kinds = map { $_ => 1 } qw(conf main upstream top configure init http server location lua skip);
my $n_example = 0;
my %checked;
for my $doc ("$Repo/README.md", sort glob "$Repo/docs/*.md") {
    my $name = File::Basename::basename($doc);
    $name = "docs/$name" if $doc =~ m{/docs/};
    my @lines = split /\n/, slurp($doc);
    for (my $i = 0; $i < @lines; $i++) {
        next unless $lines[$i] =~ /^```(\w+)\s*$/;
        my $lang = $1;
        my $start = $i + 1;
        my @code;
        for ($i++; $i < @lines && $lines[$i] !~ /^```\s*$/; $i++) { push @code, $lines[$i] }
        next unless $lang eq 'lua' || $lang eq 'nginx';
        my $code = join("\n", @code) . "\n";
        my $where = "$name:$start ($lang)";
        my $j = $start - 2;
        $j-- while $j >= 0 && $lines[$j] !~ /\S/;
        my ($kind, $opts) = $j >= 0 && $lines[$j] =~ /^<!--\s*check:\s*(\w+)\s*(.*?)\s*-->\s*$/ ? ($1, $2) : (undef, '');
        if (!defined $kind) {
            $kind = 'conf' if $lang eq 'nginx' && $code =~ /^\s*http\s*\{/m;
        }
        if (!defined $kind || !$kinds{$kind}) {
            fail("$where: a complete nginx.conf, or marked with <!-- check: KIND --> in the line above the fence");
            next;
        }
        $n_example++;
        $checked{$kind}++;
        if ($kind eq 'skip') {
            ok($opts =~ /\S/, "$where: skipped, for a reason ($opts)");
            next;
        }
        my $dir = "$Scratch/doc$n_example";
        File::Path::make_path($dir);
        # files the example reads, created under the scratch directory
        if ($opts =~ /\bfiles=(\S+)/) {
            for my $f (split /,/, $1) {
                File::Path::make_path(File::Basename::dirname("$dir/files$f"));
                spew("$dir/files$f", "example-secret-0123456789abcdef\n");
                $code =~ s/\Q$f\E/$dir\/files$f/g;
            }
        }
        # the install directories of the README's nginx.conf: this checkout's
        $code =~ s{/usr/local/share/lua/5\.1/}{$Repo/lua/}g;
        $code =~ s{/usr/local/lib/lua/5\.1/}{$Lib/}g;
        if ($lang eq 'lua') {
            my $lua;
            if ($kind eq 'upstream') {
                $lua = qq{return { upstreams = { api = { peers = { "127.0.0.1:8080" },\n$code} } }\n};
            } elsif ($kind eq 'top') {
                $lua = qq{return { upstreams = { api = { peers = { "127.0.0.1:8080" } } },\n$code}\n};
            } elsif ($kind eq 'configure') {
                $lua = "return $code";
            } elsif ($kind eq 'init') {
                $lang = 'nginx';
                $code = "init_by_lua_block {\n    autoscale = require \"resty.autoscale\"\n$code}\n";
                $kind = 'http';
            } elsif ($kind eq 'lua') {
                spew("$dir/code.lua", $code);
                my ($rc, $out) = run_lua("$dir/lua", qq{local f, err = loadfile("$dir/code.lua")\n}
                    . qq{io.open("$dir/syntax", "w"):write(f and "ok" or err):close()\nos.exit(0)\n});
                is(slurp("$dir/syntax") // $out, 'ok', "$where: Lua syntax");
                next;
            } else {
                fail("$where: a Lua example cannot be checked as '$kind'");
                next;
            }
            if ($lang eq 'lua') {
                spew("$dir/example.lua", $lua);
                my ($rc, $out) = run_check('--lua', "$dir/example.lua");
                is($rc, 0, "$where: valid ($kind)") or diag("$out\n$lua");
                next;
            }
        }
        # nginx
        my $conf;
        if ($kind eq 'conf') {
            $conf = $code;
        } elsif ($kind eq 'main') {
            ($conf = conf_around_http('')) =~ s/http \{.*//s;
            my $paths = '';
            $paths .= qq{    lua_package_path "$Repo/lua/?.lua;;";\n} unless $code =~ /\blua_package_path\b/;
            $paths .= qq{    lua_package_cpath "$Lib/?.so;;";\n} unless $code =~ /\blua_package_cpath\b/;
            (my $c = $code) =~ s/^(\s*http\s*\{[^\n]*\n)/$1$paths/m;
            $conf .= $c;
        } elsif ($kind eq 'http') {
            $conf = conf_around_http($code);
        } elsif ($kind eq 'server') {
            $conf = conf_around_http("upstream api { server 127.0.0.1:1; }\n"
                                     . "server {\n    listen 127.0.0.1:$Port;\n$code\n}\n");
        } elsif ($kind eq 'location') {
            $conf = conf_around_http("upstream api { server 127.0.0.1:1; }\n"
                                     . "server {\n    listen 127.0.0.1:$Port;\n    location / {\n$code\n    }\n}\n");
        } else {
            fail("$where: an nginx example cannot be checked as '$kind'");
            next;
        }
        spew("$dir/nginx.conf", $conf);
        if ($conf =~ /^\s*init_by_lua/m) {
            my ($rc, $out) = run_check('--conf', "$dir/nginx.conf");
            is($rc, 0, "$where: the check accepts its Lua configuration") or diag("$out\n$conf");
        }
        # nginx -t: directives and syntax, in a scratch prefix (its own pid, error log and temp paths)
        my $t = $conf;
        $t =~ s/^(\s*load_module[^\n]*\n)*//;
        my @load = @Modules;
        if ($t =~ /^[ \t]*autoscale(?:[ \t]+[\w.-]+)?[ \t]*;/m) {
            ok(-f $Native_module, "$where: the native module is built (make module)") or next;
            push @load, $Native_module;
        }
        my $head = join('', map { "load_module $_;\n" } @load)
                 . "pid $dir/nginx.pid;\nerror_log $dir/error.log;\n";
        $t =~ s/\bhttp\s*\{/"http {\n" . join('', map { "    ${_}_temp_path $dir\/${_}_temp;\n" }
                                                  qw(client_body proxy fastcgi uwsgi scgi))
                                   . "    access_log off;\n"/e;
        # a listener the test may use
        $t =~ s/^(\s*)listen\s+[^;]+;/$1listen 127.0.0.1:$Port;/mg;
        # access_log / error_log paths of the example go to the scratch directory
        $t =~ s{^(\s*(?:access_log|error_log)\s+)/\S+}{$1$dir/example.log}mg;
        spew("$dir/t.conf", $head . $t);
        my $out = `$Nginx -t -q -p $dir/ -e $dir/error.log -c $dir/t.conf 2>&1`;
        is($? >> 8, 0, "$where: nginx -t") or diag("$out\n$head$t");
    }
}
# example configuration files under docs/ (an nginx.conf each), checked as they stand
for my $conf (sort(glob("$Repo/docs/*.conf"), glob("$Repo/docs/*/*.conf"))) {
    (my $where = $conf) =~ s{^\Q$Repo\E/}{};
    my $text = slurp($conf);
    next unless $text =~ /^\s*init_by_lua/m;
    $n_example++;
    $checked{file}++;
    my $dir = "$Scratch/docfile$n_example";
    File::Path::make_path($dir);
    $text =~ s{/usr/local/share/lua/5\.1/}{$Repo/lua/}g;
    $text =~ s{/usr/local/lib/lua/5\.1/}{$Lib/}g;
    spew("$dir/nginx.conf", $text);
    my ($rc, $out) = run_check('--conf', "$dir/nginx.conf");
    is($rc, 0, "$where: the check accepts its Lua configuration") or diag($out);
}
ok($n_example >= 14, "examples found in README.md and docs/ ($n_example: "
   . join(', ', map { "$_ $checked{$_}" } sort keys %checked) . ")");

############################################################################ 3. the check itself

{
    my $dir = "$Scratch/self";
    File::Path::make_path($dir);
    spew("$dir/many.lua", <<'LUA');
return { max_peers = 0, upstreams = {
    api = { peers = { "127.0.0.1:1" }, retries = 1.5, scaling = { utilization = { capacity = 8 }, forecast = { lead_time = 10 } } },
    web = { peers = {} } } }
LUA
    my ($rc, $out) = run_check("$dir/many.lua");
    is($rc, 1, 'several errors: exit 1');
    for my $e ('max_peers: must be between 1 and 65536 (got 0)',
               'upstreams.api.retries: must be an integer between 0 and 100 (got 1.5)',
               'upstreams.api.scaling.forecast: forecasts the request rate: needs the rps signal',
               'upstreams.web.peers: must be a non-empty list of peers') {
        like($out, qr/^error: resty\.autoscale: \Q$e\E$/m, "every error is printed with its field: $e");
    }
    spew("$dir/admin.lua", qq{return { upstreams = { api = { peers = { "127.0.0.1:1" } } } },\n}
                           . qq{       { token_env = "AUTOSCALE_SHORT_TOKEN", allow = { "localhost" }, max_body = 1 }\n});
    ($rc, $out) = run_check("$dir/admin.lua");
    is($rc, 1, 'several admin errors: exit 1');
    for my $e ('admin.token_env: the token must be at least 16 characters', 'admin.allow[1]: must be an IPv4 or IPv6',
               'admin.max_body: must be an integer between 64 and 1048576 (got 1)') {
        like($out, qr/^error: resty\.autoscale: \Q$e\E/m, "every admin error is printed with its field: $e");
    }
    spew("$dir/ok.lua", qq{return { upstreams = { api = { peers = { "127.0.0.1:1" } } } },\n}
                        . qq{       { token_env = "AUTOSCALE_ADMIN_TOKEN" }\n});
    ($rc, $out) = run_check("$dir/ok.lua");
    is($rc, 0, 'a valid configuration with its admin table: exit 0') or diag($out);
    like($out, qr/: ok$/m, '... and says ok');
    ($rc, $out) = run_check("$dir/none.lua");
    is($rc, 2, 'an unreadable file: exit 2');
    spew("$dir/nohttp.conf", "events {}\n");
    ($rc, $out) = run_check("$dir/nohttp.conf");
    is($rc, 2, 'an nginx.conf without an http block: exit 2');
    like($out, qr/no http block/, '... saying so');
    # includes are followed, relative to the conf's directory, and init_by_lua_file is read from the prefix
    File::Path::make_path("$dir/etc/conf.d", "$dir/prefix/lua");
    spew("$dir/prefix/lua/init.lua",
         qq{assert(ngx.config.prefix() == "$dir/prefix/", "prefix: " .. ngx.config.prefix())\n}
         . qq{require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" }, retries = -1 } } }\n});
    spew("$dir/etc/conf.d/autoscale.conf", "init_by_lua_file lua/init.lua;\n");
    spew("$dir/etc/nginx.conf", conf_around_http("    include conf.d/*.conf;  # { in a comment\n"));
    ($rc, $out) = run_check('-p', "$dir/prefix", "$dir/etc/nginx.conf");
    is($rc, 1, 'include + init_by_lua_file relative to the prefix, run with that prefix: the error is found');
    like($out, qr/upstreams\.api\.retries: must be between 0 and 100 \(got -1\)/, '... with its field');
    # braces inside Lua strings and comments do not end the block; nginx's quoting and comments outside it
    spew("$dir/braces.conf", conf_around_http(<<'CONF'));
    set_real_ip_from 127.0.0.1;   # a comment with a brace }
    init_by_lua_block {
        local s = "}" .. '}' .. [[ } ]] .. [==[ } ]==]  -- }
        --[[ } ]]
        require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" }, retries = 100 + #s } } }
    }
    init_worker_by_lua_block { local x = "{" }
CONF
    ($rc, $out) = run_check("$dir/braces.conf");
    is($rc, 1, 'braces in Lua strings and comments: the whole init block is run');
    like($out, qr/upstreams\.api\.retries: must be between 0 and 100 \(got 1\d\d?\)/, '... to its end')
        or diag($out);
    # a running nginx is not touched: the check opens no listening socket and leaves nothing behind
    spew("$dir/listen.conf", conf_around_http(
        qq{    init_by_lua_block { require("resty.autoscale").configure { upstreams = { api = { peers = { "127.0.0.1:1" } } } } }\n}
        . "    server { listen 127.0.0.1:$Port; }\n"));
    ($rc, $out) = run_check("$dir/listen.conf");
    is($rc, 0, 'a valid nginx.conf: exit 0') or diag($out);
    my @after = glob "$Scratch/tmp/resty-autoscale-check.*";
    is(scalar @after, 0, 'no scratch directory is left behind') or diag("@after");
}

done_testing();
